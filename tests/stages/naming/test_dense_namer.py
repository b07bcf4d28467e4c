"""The dense namer's rules on probabilities given by hand: pixels, cluster means, votes,
``prob_thd``, candidates; and the pieces of NACLIP's geometry (windows, resize, neighbourhood)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from freesegdiff.config import DenseConfig, PipelineConfig, with_settings
from freesegdiff.errors import ConfigError
from freesegdiff.stages.naming.dense import (
    DenseNamer,
    gaussian_neighbourhood,
    imagenet_templates,
    resized_size,
    window_origins,
)

CPU = torch.device("cpu")


@dataclass
class Vocabulary:
    texts: list[str]
    candidates: list[str]


class GivenProbabilities:
    """Stands in for DenseClip: returns the probabilities it was given."""

    def __init__(self, probs: np.ndarray, config: DenseConfig) -> None:
        self.probs = torch.tensor(probs, dtype=torch.float32)
        self.config = config

    def probabilities(self, image: np.ndarray, texts: list[str]) -> torch.Tensor:
        assert image.shape[:2] == self.probs.shape[1:] and len(texts) == len(self.probs)
        return self.probs


# Three texts over a 2 x 3 image; columns: pixel (row, col).
PROBS = np.array(
    [
        [[0.7, 0.6, 0.1], [0.2, 0.05, 0.3]],  # cat
        [[0.2, 0.3, 0.1], [0.7, 0.05, 0.3]],  # sofa
        [[0.1, 0.1, 0.8], [0.1, 0.90, 0.4]],  # floor
    ]
)
IMAGE = np.zeros((2, 3, 3), np.uint8)
TEXTS = ["cat", "sofa", "floor"]


def namer(**settings: object) -> DenseNamer:
    config = replace(DenseConfig(), **settings)  # type: ignore[arg-type]
    return DenseNamer(GivenProbabilities(PROBS, config))  # type: ignore[arg-type]


def test_pixels_take_their_best_text_and_regions_are_the_pixels_sharing_one():
    (naming,) = namer(regions="pixels")([IMAGE], [None], [Vocabulary(TEXTS, TEXTS)])
    # best texts: [[cat, cat, floor], [sofa, floor, floor]] -> regions cat, sofa, floor
    assert naming.cluster_labels == [0, 1, 2]
    assert naming.cluster_map.tolist() == [[0, 0, 2], [1, 2, 2]]
    assert naming.masks.shape == (3, 2, 3)
    # scores: each region's mean probabilities, e.g. floor's region (3 pixels) for "floor"
    assert naming.scores[2, 2] == pytest.approx((0.8 + 0.9 + 0.4) / 3)
    assert naming.scores[0, 0] == pytest.approx((0.7 + 0.6) / 2)


def test_pixels_below_prob_thd_are_background_last():
    # best probabilities: 0.7 0.6 0.8 / 0.7 0.9 0.4: at 0.65 the 0.6 and 0.4 pixels drop out
    (naming,) = namer(regions="pixels", prob_thd=0.65)([IMAGE], [None], [Vocabulary(TEXTS, TEXTS)])
    assert naming.cluster_labels == [0, 1, 2, -1]
    assert naming.cluster_map.tolist() == [[0, 3, 2], [1, 2, 3]]
    # a pixel exactly at the threshold keeps its text (the release's test is "below")
    (naming,) = namer(regions="pixels", prob_thd=0.6)([IMAGE], [None], [Vocabulary(TEXTS, TEXTS)])
    assert naming.cluster_map.tolist() == [[0, 0, 2], [1, 2, 3]]


def test_texts_that_are_not_candidates_cannot_win_a_pixel():
    vocabulary = Vocabulary(TEXTS, ["cat", "sofa"])  # floor pruned by the caption
    (naming,) = namer(regions="pixels")([IMAGE], [None], [vocabulary])
    # floor's pixels take their best candidate: (0, 2) cat 0.1 vs sofa 0.1 -> cat (first);
    # (1, 1) 0.05 vs 0.05 -> cat; (1, 2) 0.3 vs 0.3 -> cat
    assert naming.cluster_map.tolist() == [[0, 0, 0], [1, 0, 0]]
    assert naming.cluster_labels == [0, 1]
    (naming,) = namer(regions="pixels")([IMAGE], [None], [Vocabulary(TEXTS, [])])
    assert naming.cluster_labels == [-1] and naming.cluster_map.tolist() == [[0] * 3] * 2


CLUSTERS = torch.tensor([[0, 0, 1], [1, 1, 1]])  # cluster 0: two pixels, cluster 1: four


def test_clusters_take_the_text_of_highest_mean_probability():
    (naming,) = namer()([IMAGE], [CLUSTERS], [Vocabulary(TEXTS, TEXTS)])
    # cluster 0: cat (0.7 + 0.6) / 2 = 0.65; cluster 1: floor (0.8 + 0.1 + 0.9 + 0.4) / 4 = 0.55
    assert naming.cluster_labels == [0, 2]
    assert naming.scores[:, 1] == pytest.approx([0.1625, 0.2875, 0.55])
    assert naming.cluster_map is not None and naming.cluster_map.tolist() == CLUSTERS.tolist()
    # a cluster whose best mean is below prob_thd is background
    (naming,) = namer(prob_thd=0.6)([IMAGE], [CLUSTERS], [Vocabulary(TEXTS, TEXTS)])
    assert naming.cluster_labels == [0, -1]
    # two clusters may take the same text (unlike the masked-image rule)
    (naming,) = namer()([IMAGE], [torch.tensor([[0, 0, 1], [0, 1, 1]])], [Vocabulary(TEXTS, TEXTS)])
    assert naming.cluster_labels == [0, 2]
    (naming,) = namer()(
        [IMAGE], [torch.tensor([[0, 1, 1], [1, 1, 1]])], [Vocabulary(TEXTS, ["cat"])]
    )
    assert naming.cluster_labels == [0, 0]


def test_clusters_by_vote_count_background_pixels_too():
    # pixel labels: [[cat, cat, floor], [sofa, floor, floor]]
    (naming,) = namer(region_rule="vote")([IMAGE], [CLUSTERS], [Vocabulary(TEXTS, TEXTS)])
    assert naming.cluster_labels == [0, 2]  # cluster 1: floor 3 votes, sofa 1
    # at 0.75 only (0, 2) floor 0.8 and (1, 1) floor 0.9 keep a label: cluster 1 votes
    # floor 2, background 2 -> the tie goes to the text; cluster 0 is all background
    (naming,) = namer(region_rule="vote", prob_thd=0.75)(
        [IMAGE], [CLUSTERS], [Vocabulary(TEXTS, TEXTS)]
    )
    assert naming.cluster_labels == [-1, 2]


def test_sliding_windows_as_released():
    assert window_origins(336, 224, 112) == [0, 112]
    assert window_origins(500, 224, 112) == [0, 112, 224, 276]  # the last pushed back
    assert window_origins(200, 224, 112) == [0]  # a small side: one window of the side
    assert window_origins(224, 224, 112) == [0]


def test_resize_fits_the_short_side_unless_the_long_side_is_too_long():
    assert resized_size(375, 500, 336, 2048) == (336, 448)
    assert resized_size(500, 333, 336, 2048) == (505, 336)  # 500 * 336 / 333 = 504.5 -> 505
    assert resized_size(100, 4000, 336, 2048) == (51, 2048)  # the long side limits
    assert resized_size(336, 336, 336, 2048) == (336, 336)


def test_neighbourhood_is_a_gaussian_of_grid_distance_and_spares_the_class_token():
    bias = gaussian_neighbourhood(2, 3, std=5.0)
    assert bias.shape == (7, 7)
    assert bias[0].abs().sum() == 0 and bias[:, 0].abs().sum() == 0
    assert float(bias[1, 1]) == pytest.approx(1.0)
    # patch (0, 0) to patch (1, 2): squared distance 5
    assert float(bias[1, 6]) == pytest.approx(np.exp(-5 / 50), rel=1e-6)
    assert torch.equal(bias, bias.T)


def test_templates_are_clips_80():
    templates = imagenet_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert all(template.count("{}") == 1 for template in templates)


def test_dense_settings_are_checked_when_made():
    with pytest.raises(ConfigError, match=r"dense.attention must be one of"):
        with_settings(PipelineConfig(), {"dense.attention": "sliding"})
    with pytest.raises(ConfigError, match=r"dense.prob_thd must be in \[0, 1\], got 1.5"):
        with_settings(PipelineConfig(), {"dense.prob_thd": 1.5})
    with pytest.raises(ConfigError, match=r"dense.gaussian_std must be positive"):
        with_settings(PipelineConfig(), {"dense.gaussian_std": 0})
    with_settings(PipelineConfig(), {"dense.gaussian_std": 0, "dense.attention": "kk"})
    with pytest.raises(ConfigError, match=r"dense.pamr_dilations must be positive"):
        with_settings(PipelineConfig(), {"dense.pamr_dilations": [0]})


def test_template_embeddings_of_a_long_name_are_cut_at_77_tokens_with_clips_real_bpe(tmp_path):
    """CLIP's real 49,408-token BPE: each of the 80 prompts of a name too long for CLIP is cut
    to its first 76 tokens and the end token, and a short name padded beside it embeds as it
    does alone; the class embedding is the normalised mean of the normalised prompts'."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from freesegdiff.bench.tokenizers import write_clip_tokenizer_files
    from freesegdiff.stages.naming.dense import DenseClip
    from freesegdiff.stages.naming.masked_crops import _pooled

    write_clip_tokenizer_files(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 49408
    torch.manual_seed(0)
    text = {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32}
    text |= {"num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 2}
    vision = {"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32}
    vision |= {"num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    model = CLIPModel(config).eval()
    dense = DenseClip(model, SimpleNamespace(tokenizer=tokenizer), DenseConfig(), CPU)
    long_name = " ".join(["very"] * 90) + " cat"
    embeddings = dense.text_embeddings([long_name, "cat"])

    def by_hand(name: str) -> torch.Tensor:
        rows = []
        for template in imagenet_templates():
            ids = tokenizer(template.format(name))["input_ids"]  # not truncated
            if len(ids) > 77:
                ids = [*ids[:76], tokenizer.eos_token_id]
            with torch.no_grad():
                rows.append(_pooled(model.get_text_features(input_ids=torch.tensor([ids]))))
        return F.normalize(F.normalize(torch.cat(rows), dim=-1).mean(0), dim=-1)

    assert len(tokenizer(imagenet_templates()[0].format(long_name))["input_ids"]) > 90
    assert torch.allclose(embeddings[0], by_hand(long_name), atol=1e-6)
    assert torch.allclose(embeddings[1], by_hand("cat"), atol=1e-6)
