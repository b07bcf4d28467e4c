"""Fully connected CRF with Gaussian edge potentials (Krähenbühl & Koltun 2011), in torch.

This is a re-implementation of what ``pydensecrf`` computes, so that the refinement runs on the
pipeline's device and treats all masks of an image in one batch:

- the kernels are filtered with a permutohedral lattice (Adams et al. 2010), built the way
  Krähenbühl's ``permutohedral.cpp`` builds it (same elevation, rounding, barycentric weights,
  ``[0.5, 1, 0.5]`` blur along the d+1 lattice axes, the ``1 / (1 + 2^-d)`` scaling), so the
  approximation errors are the reference's own;
- each kernel is normalised symmetrically, ``D^-1/2 K D^-1/2`` with ``D = K 1``
  (``NORMALIZE_SYMMETRIC``, the reference default). The filter includes each pixel's own
  contribution: ``pydensecrf`` does not subtract it (the paper's formulation excludes it), and
  matching the reference is what counts here;
- the label compatibility is Potts, ``-compat * [l == l']`` as the reference applies it;
- mean-field inference: ``Q = softmax(-U)``, then ``iterations`` times
  ``Q = softmax(-U + sum_k compat_k * K_k Q)``.

The lattices of an image are built once and reused by every kernel application of every mask
and iteration. Both kernels are applied together as a few sparse products (splat, blurs two axes
at a time, slice), with the normalisation and the compat folded into the matrices; the masks are
the columns. For two labels the update only needs ``K_k Q_1`` (``K Q_0 = K 1 - K Q_1``), which
halves the filtering work of the mask refinement.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from freesegdiff.config import RefineConfig

__all__ = [
    "LatticeFilter",
    "PairwiseKernels",
    "PermutohedralLattice",
    "binary_dense_crf",
    "dense_crf",
    "position_features",
    "symmetric_normalisation",
    "unary_from_masks",
]


@dataclass(frozen=True)
class PermutohedralLattice:
    """A permutohedral lattice over ``num_points`` feature vectors, ready to filter values.

    Build one with :meth:`build`. Filtering is linear: :meth:`filter` approximates
    ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) values_j`` (self term included) for the features
    ``f`` the lattice was built from, exactly as the reference's ``Permutohedral::compute``.

    Attributes:
        vertex_index: (num_points, d + 1) long, the lattice vertices of each point's simplex
            (the ones it splats to and slices from), ascending within a row.
        barycentric: (num_points, d + 1) float32, the matching splat and slice weights.
        splat_order: (num_points * (d + 1),) long, the flattened (point, vertex) entries sorted
            by vertex, points ascending within a vertex (the splat matrix in CSR order).
        splat_rows: (num_vertices + 2,) long, CSR row pointers of the splat matrix.
        blur_neighbours: (d + 1, 2, num_vertices + 1) long, for each lattice axis the two
            neighbours of every vertex; index ``num_vertices`` is an always-zero vertex that
            stands for "no neighbour" (the reference's index -1).
        num_vertices: the number of lattice vertices that points splat to.
    """

    vertex_index: torch.Tensor
    barycentric: torch.Tensor
    splat_order: torch.Tensor
    splat_rows: torch.Tensor
    blur_neighbours: torch.Tensor
    num_vertices: int

    @property
    def num_points(self) -> int:
        return int(self.barycentric.shape[0])

    @property
    def dim(self) -> int:
        """The feature dimension d."""
        return int(self.barycentric.shape[1]) - 1

    @classmethod
    def build(cls, features: torch.Tensor) -> PermutohedralLattice:
        """Embed ``features`` (num_points, d) in the lattice, as ``permutohedral.cpp`` does.

        The arithmetic that decides which simplex a point falls in is the reference's, in
        float32 and in the same order, so both pick the same vertices and weights.
        """
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be (num_points, d), got shape {tuple(features.shape)}")
        num_points, d = features.shape
        device = features.device
        # (d, P): one contiguous row per feature
        features_t = features.to(torch.float32).t().contiguous()

        # Elevate onto the plane x . 1 = 0 of R^(d+1) (y = E f, Adams et al. p.5), in the
        # reference's float order.
        inv_std_dev = _f32(math.sqrt(2.0 / 3.0) * (d + 1))
        running = torch.zeros(num_points, dtype=torch.float32, device=device)
        elevated = torch.empty(d + 1, num_points, dtype=torch.float32, device=device)
        for j in range(d, 0, -1):
            scaled = features_t[j - 1] * _f32(1.0 / math.sqrt((j + 1) * j) * inv_std_dev)
            elevated[j] = running - j * scaled
            running = running + scaled
        elevated[0] = running

        # Nearest remainder-0 point: each coordinate rounded to a multiple of d + 1, half to
        # even like the SSE rounding the reference is compiled with.
        down = _f32(1.0 / (d + 1))
        rounded = torch.round(elevated * down)
        rem0 = rounded * (d + 1)
        coordinate_sum = rounded.sum(dim=0)

        # Rank of each coordinate of the remainder, ties broken as the reference does.
        residual = elevated - rem0
        rank = torch.zeros(d + 1, num_points, dtype=torch.float32, device=device)
        for i in range(d):
            smaller = (residual[i : i + 1] < residual[i + 1 :]).to(torch.float32)
            rank[i] += smaller.sum(dim=0)
            rank[i + 1 :] += 1.0 - smaller
        rank += coordinate_sum
        shift = ((rank < 0).to(torch.float32) - (rank >= d + 1).to(torch.float32)) * (d + 1)
        rank += shift
        rem0 += shift
        rank_long = rank.to(torch.long)

        # Barycentric coordinates in the simplex (p.10): the reference adds v_i at slot
        # d - rank_i and subtracts it at the next slot; rank is a permutation, so with v in
        # slot order (sorted) that is b_p = sorted_p - sorted_(p-1), the last wrapping to b_0.
        delta = (elevated - rem0) * down
        slot = d - rank_long  # (d+1, P), a permutation of 0..d per point
        in_slot_order = torch.empty_like(delta).scatter_(0, slot, delta)
        barycentric = in_slot_order.clone()
        barycentric[1:] -= in_slot_order[:-1]
        barycentric[0] += 1.0 - in_slot_order[d]
        barycentric = barycentric.t()  # (P, d+1)

        # A simplex is given by its remainder-0 corner and the rank permutation; neighbouring
        # pixels share most simplices, so the vertex keys are computed once per simplex.
        corner = (rem0[:d] * down).round().to(torch.long)  # (d, P), integers
        corner_low = corner.amin(dim=1, keepdim=True)
        corner_extent = corner.amax(dim=1, keepdim=True) - corner_low + 1
        radix = torch.cat([corner_extent[:, 0], torch.full((d,), d + 1, device=device)])
        digits = torch.cat([corner - corner_low, rank_long[:d]])  # (2d, P)
        simplex_id = _pack(digits, _strides(radix))
        simplex_keys, simplex_of_point = torch.unique(simplex_id, return_inverse=True)
        representative = torch.zeros_like(simplex_keys).scatter_(
            0, simplex_of_point, torch.arange(num_points, device=device)
        )
        simplex_rem0 = rem0[:d].index_select(1, representative).to(torch.long)  # (d, S)
        simplex_rank = rank_long[:d].index_select(1, representative)  # (d, S)

        # Vertex keys: key_i = rem0_i + canonical[remainder, rank_i] for the first d
        # coordinates (the last one follows from the zero sum), packed into one int64 with room
        # for the blur neighbours (+-(d+1) on one coordinate, -+1 on the others).
        remainder = torch.arange(d + 1, device=device)
        # canonical[remainder, rank]: the remainder, less d + 1 where rank > d - remainder
        wraps = (remainder[None, :] > d - remainder[:, None]).to(torch.long)
        canonical = remainder[:, None] - (d + 1) * wraps
        margin = 2 * d + 1
        key_low = simplex_rem0.amin(dim=1, keepdim=True) - margin
        key_extent = simplex_rem0.amax(dim=1, keepdim=True) + margin - key_low + 1
        strides = _strides(key_extent[:, 0])
        simplex_vertex_keys = _pack(simplex_rem0 - key_low, strides).expand(d + 1, -1).clone()
        for i in range(d):  # (d+1 remainders, S) += canonical[remainder, rank_i] * stride_i
            step = canonical.index_select(1, simplex_rank[i]) * int(strides[i])
            simplex_vertex_keys += step
        vertex_keys, simplex_vertices = torch.unique(simplex_vertex_keys.t(), return_inverse=True)
        num_vertices = int(vertex_keys.shape[0])

        # Each point's vertices, ascending (CSR column order), with their weights.
        simplex_vertices, simplex_order = simplex_vertices.sort(dim=1)
        vertex_index = simplex_vertices.index_select(0, simplex_of_point)  # (P, d+1)
        point_order = simplex_order.index_select(0, simplex_of_point)
        barycentric = barycentric.gather(1, point_order).contiguous()

        # The splat matrix in CSR order: entries grouped by vertex, points ascending.
        flat_vertex = vertex_index.reshape(-1)
        splat_order = torch.sort(flat_vertex.to(torch.int32), stable=True).indices
        counts = torch.bincount(flat_vertex, minlength=num_vertices + 1)
        splat_rows = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

        # Blur neighbours along lattice axis j: n1 = key - 1 + (d+1) e_j and n2 = key + 1 -
        # (d+1) e_j (for j = d only the -1 / +1 part, the last coordinate being implicit).
        # n2 is the inverse of n1, so one binary search per axis finds both.
        all_ones = int(strides.sum())
        axis_stride = [*strides.tolist(), 0]
        vertex_ids = torch.arange(num_vertices, device=device)
        neighbours = torch.full(
            (d + 1, 2, num_vertices + 1), num_vertices, dtype=torch.long, device=device
        )
        for j in range(d + 1):
            target = vertex_keys + ((d + 1) * axis_stride[j] - all_ones)
            found = torch.searchsorted(vertex_keys, target).clamp_(max=num_vertices - 1)
            exists = vertex_keys.index_select(0, found) == target
            neighbours[j, 0, :num_vertices] = torch.where(exists, found, num_vertices)
            neighbours[j, 1].index_put_((found[exists],), vertex_ids[exists])
        return cls(
            vertex_index=vertex_index,
            barycentric=barycentric,
            splat_order=splat_order,
            splat_rows=splat_rows,
            blur_neighbours=neighbours,
            num_vertices=num_vertices,
        )

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian-filter ``values`` (num_points, C) float32 -> (num_points, C).

        For a one-off filter; :class:`LatticeFilter` is faster at filtering many times.
        """
        num_points, channels = values.shape
        d = self.dim
        flat_vertex = self.vertex_index.reshape(-1)
        weighted = (self.barycentric[:, :, None] * values[:, None, :]).reshape(-1, channels)
        lattice_values = values.new_zeros(self.num_vertices + 1, channels)
        lattice_values.index_add_(0, flat_vertex, weighted)
        lattice_values = _blur(lattice_values, self.blur_neighbours)
        sliced = lattice_values.index_select(0, flat_vertex).view(num_points, d + 1, channels)
        return (sliced * self.barycentric[:, :, None]).sum(dim=1) * _f32(1.0 / (1.0 + 2.0 ** (-d)))


class LatticeFilter:
    """``sum_k diag(post_k) K_k diag(pre_k)`` for kernels ``K_k`` of lattices on the same points.

    The lattices are stacked into one: a single sparse product splats the values onto all of
    them, their blurs run side by side, and a single sparse product slices and sums the results.
    The per-point factors (normalisation, compat) are folded into the sparse matrices.

    Args:
        terms: ``(lattice, pre_scale, post_scale)`` per kernel; the scales are (num_points,)
            float32 or None.
    """

    def __init__(
        self,
        terms: Sequence[tuple[PermutohedralLattice, torch.Tensor | None, torch.Tensor | None]],
    ) -> None:
        if not terms:
            raise ValueError("a LatticeFilter needs at least one lattice")
        num_points = terms[0][0].num_points
        if any(lattice.num_points != num_points for lattice, _, _ in terms):
            raise ValueError("all lattices of a LatticeFilter must be on the same points")
        num_axes = max(lattice.dim + 1 for lattice, _, _ in terms)
        splat_rows, splat_columns, splat_values = [], [], []
        slice_columns, slice_values = [], []
        neighbours = []
        vertex_offset = entry_offset = 0
        empty_vertices: list[int] = []  # each lattice's always-zero vertex
        for lattice, pre_scale, post_scale in terms:
            d = lattice.dim
            weights = lattice.barycentric  # (P, d+1)
            if pre_scale is not None:
                weights = weights * pre_scale[:, None]
            splat_rows.append(lattice.splat_rows[:-1] + entry_offset)
            splat_columns.append(torch.div(lattice.splat_order, d + 1, rounding_mode="floor"))
            splat_values.append(weights.reshape(-1).index_select(0, lattice.splat_order))
            entry_offset += lattice.splat_order.numel()

            # The reference's "magic" alpha = 1 / (1 + 2^-d) scales every slice.
            weights = lattice.barycentric * _f32(1.0 / (1.0 + 2.0 ** (-d)))
            if post_scale is not None:
                weights = weights * post_scale[:, None]
            slice_columns.append(lattice.vertex_index + vertex_offset)
            slice_values.append(weights)

            # A lattice with fewer axes idles on the others: both neighbours are its empty vertex.
            empty = vertex_offset + lattice.num_vertices
            blur = lattice.blur_neighbours + vertex_offset
            idle = blur.new_full((num_axes - d - 1, 2, lattice.num_vertices + 1), empty)
            neighbours.append(torch.cat([blur, idle]))
            empty_vertices.append(empty)
            vertex_offset += lattice.num_vertices + 1

        device = terms[0][0].barycentric.device
        end = torch.tensor([entry_offset], dtype=torch.long, device=device)
        self.splat = _csr(  # (V, P), V = all vertices of all lattices
            torch.cat([*splat_rows, end]),
            torch.cat(splat_columns),
            torch.cat(splat_values),
            (vertex_offset, num_points),
        )
        per_point = sum(lattice.dim + 1 for lattice, _, _ in terms)
        self.slice = _csr(  # (P, V)
            torch.arange(0, num_points * per_point + 1, per_point, device=device),
            torch.cat(slice_columns, dim=1).reshape(-1),
            torch.cat(slice_values, dim=1).reshape(-1),
            (num_points, vertex_offset),
        )
        # The blurs along consecutive axes, two by two, as sparse matrices (about 5 entries a
        # row for two axes): few large operations rather than many small ones.
        is_empty = torch.zeros(vertex_offset, dtype=torch.bool, device=device)
        is_empty[torch.tensor(empty_vertices, device=device)] = True
        blur_neighbours = torch.cat(neighbours, dim=2)  # (axes, 2, V)
        self.blurs = [
            _blur_matrix(blur_neighbours[start : start + _AXES_PER_BLUR], is_empty)
            for start in range(0, num_axes, _AXES_PER_BLUR)
        ]

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """(num_points, C) float32 -> (num_points, C): splat, blur, slice."""
        lattice_values = self.splat @ values.contiguous()  # (V, C)
        for blur in self.blurs:
            lattice_values = blur @ lattice_values
        return self.slice @ lattice_values


# How many lattice axes one sparse blur matrix covers. The product of the 6 axis blurs of the
# bilateral lattice has ~100 entries a row, a product of two ~5.
_AXES_PER_BLUR = 2


def _blur_matrix(neighbours: torch.Tensor, is_empty: torch.Tensor) -> torch.Tensor:
    """Sparse CSR (V, V): ``[0.5, 1, 0.5]`` blurs along the axes of ``neighbours`` (axes, 2, V),
    the first axis applied first; entries towards empty (always zero) vertices get weight 0."""
    num_vertices = neighbours.shape[2]
    device = neighbours.device
    columns = torch.arange(num_vertices, device=device)[:, None]  # (V, 1)
    weights = torch.ones(num_vertices, 1, device=device)
    # Row i of B_last ... B_first: expand from the last axis back, 3 ways per axis.
    for first, second in reversed(neighbours):
        flat = columns.reshape(-1)
        steps = [axis.index_select(0, flat).view_as(columns) for axis in (first, second)]
        columns = torch.cat([columns, *steps], dim=1)
        weights = torch.cat([weights, 0.5 * weights, 0.5 * weights], dim=1)
    weights = weights.masked_fill(is_empty[columns], 0.0)
    # Sort each row's columns and merge repeats (several ways into the same empty vertex, or
    # into the same vertex for a 1-D lattice, whose two axes are opposite).
    columns, order = columns.sort(dim=1)
    weights = weights.gather(1, order)
    rows = torch.arange(num_vertices, device=device)[:, None]
    entries = (rows * num_vertices + columns).reshape(-1)  # ascending: row-major
    entries, position = torch.unique_consecutive(entries, return_inverse=True)
    merged = weights.new_zeros(entries.shape[0]).index_add_(0, position, weights.reshape(-1))
    counts = torch.bincount(
        torch.div(entries, num_vertices, rounding_mode="floor"), minlength=num_vertices
    )
    return _csr(
        torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        entries % num_vertices,
        merged,
        (num_vertices, num_vertices),
    )


def _blur(lattice_values: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """(V, C) -> (V, C): ``[0.5, 1, 0.5]`` along each lattice axis, neighbours (axes, 2, V)."""
    for first, second in neighbours:
        neighbour_sum = lattice_values.index_select(0, first)
        neighbour_sum += lattice_values.index_select(0, second)
        lattice_values = torch.add(lattice_values, neighbour_sum, alpha=0.5)
    return lattice_values


def _csr(
    rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """A sparse CSR matrix; 32-bit indices where they fit (faster sparse products on the CPU)."""
    index_dtype = torch.int32 if max(size) < 2**31 and values.numel() < 2**31 else torch.long
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(
            rows.to(index_dtype),
            columns.to(index_dtype),
            values,
            size=size,
            check_invariants=False,
        )


def _strides(extent: torch.Tensor) -> torch.Tensor:
    """Mixed-radix strides (1, e0, e0*e1, ...) for digit extents ``extent`` (n,)."""
    strides = [1]
    for value in extent.tolist()[:-1]:
        strides.append(strides[-1] * int(value))
    if strides[-1] * int(extent[-1]) >= 2**62:
        raise ValueError(
            "the features span too many lattice cells for 64-bit keys: use larger kernel "
            "widths (sxy, srgb) or a smaller image"
        )
    return torch.tensor(strides, dtype=torch.long, device=extent.device)


def _pack(digits: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """(n, P) non-negative digits, (n,) strides -> (P,) int64 ``sum_i digits_i * strides_i``."""
    packed = torch.zeros(digits.shape[1], dtype=torch.long, device=digits.device)
    for row, stride in zip(digits, strides.tolist(), strict=True):
        packed.add_(row, alpha=stride)
    return packed


def _f32(value: float) -> float:
    """Round a Python float to float32 precision, as the reference's C++ ``float`` does."""
    return float(torch.tensor(value, dtype=torch.float32))


def position_features(height: int, width: int, sxy: float, device: torch.device) -> torch.Tensor:
    """(height * width, 2) float32 features (x / sxy, y / sxy), pixels in row-major order."""
    xs = torch.arange(width, dtype=torch.float32, device=device) / _f32(sxy)
    ys = torch.arange(height, dtype=torch.float32, device=device) / _f32(sxy)
    return torch.stack(
        [xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1
    ).reshape(-1, 2)


def symmetric_normalisation(lattice: PermutohedralLattice) -> torch.Tensor:
    """(num_points,) ``1 / sqrt(K 1)``: the reference's ``NORMALIZE_SYMMETRIC`` uses
    ``D^-1/2 K D^-1/2`` with ``D = diag(K 1)``."""
    ones = torch.ones(lattice.num_points, 1, device=lattice.barycentric.device)
    return 1.0 / torch.sqrt(lattice.filter(ones)[:, 0] + 1e-20)


def unary_from_masks(masks: torch.Tensor, gt_prob: float) -> torch.Tensor:
    """Unary energies of ``pydensecrf.utils.unary_from_labels(mask, 2, gt_prob, False)``.

    Args:
        masks: (B, H, W) bool, the coarse labels (True: label 1).
        gt_prob: confidence of the labels, in (0, 1).

    Returns:
        (B, 2, H, W) float32, ``-log(gt_prob)`` for the given label and ``-log(1 - gt_prob)`` for
        the other one.
    """
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    sure = _f32(-math.log(gt_prob))
    other = _f32(-math.log(1.0 - gt_prob))
    label_one = masks.to(torch.float32)
    energy_one = other + (sure - other) * label_one
    energy_zero = sure + (other - sure) * label_one
    return torch.stack([energy_zero, energy_one], dim=1)


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {tuple(image.shape)}")


class PairwiseKernels:
    """The weighted pairwise terms of one image: ``q -> sum_k compat_k * K_k q``.

    ``K_1`` is the Gaussian (position) kernel ``exp(-|p_i - p_j|^2 / (2 gaussian_sxy^2))``,
    ``K_2`` the bilateral kernel ``exp(-|p_i - p_j|^2 / (2 bilateral_sxy^2) - |I_i - I_j|^2 /
    (2 bilateral_srgb^2))``, both normalised symmetrically. The lattices are built here, once;
    a kernel whose compat is 0 is left out.

    Args:
        image: (H, W, 3) uint8 or float RGB (0..255), on the device to compute on.
        gaussian_sxy, gaussian_compat: position kernel width (pixels) and Potts weight.
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel widths (pixels,
            intensity levels) and Potts weight.
    """

    def __init__(
        self,
        image: torch.Tensor,
        *,
        gaussian_sxy: float,
        gaussian_compat: float,
        bilateral_sxy: float,
        bilateral_srgb: float,
        bilateral_compat: float,
    ) -> None:
        _check_image(image)
        for name, value in (
            ("gaussian_sxy", gaussian_sxy),
            ("bilateral_sxy", bilateral_sxy),
            ("bilateral_srgb", bilateral_srgb),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        height, width, _ = image.shape
        device = image.device
        lattices: list[tuple[PermutohedralLattice, float]] = []
        if gaussian_compat != 0:
            positions = position_features(height, width, gaussian_sxy, device)
            lattices.append((PermutohedralLattice.build(positions), gaussian_compat))
        if bilateral_compat != 0:
            colour = image.reshape(-1, 3).to(torch.float32) / _f32(bilateral_srgb)
            positions = position_features(height, width, bilateral_sxy, device)
            features = torch.cat([positions, colour], dim=1)
            lattices.append((PermutohedralLattice.build(features), bilateral_compat))
        terms = []
        for lattice, compat in lattices:
            norm = symmetric_normalisation(lattice)
            terms.append((lattice, norm, norm * compat))
        self.filter = LatticeFilter(terms) if terms else None

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """(H * W, C) float32 label probabilities, pixels row-major -> (H * W, C) messages."""
        if self.filter is None:
            return torch.zeros_like(q)
        return self.filter(q)


def dense_crf(
    image: torch.Tensor,
    unary: torch.Tensor,
    *,
    gaussian_sxy: float = 20.0,
    gaussian_compat: float = 5.0,
    bilateral_sxy: float = 20.0,
    bilateral_srgb: float = 20.0,
    bilateral_compat: float = 100.0,
    iterations: int = 10,
) -> torch.Tensor:
    """Mean-field inference of a dense CRF on one image, for a batch of unaries.

    Args:
        image: (H, W, 3) uint8 or float RGB (0..255), on the device to compute on.
        unary: (B, L, H, W) float unary energies (negative log probabilities), one CRF per
            batch element, all sharing the image's kernels.
        gaussian_sxy, gaussian_compat: position kernel width (pixels) and Potts weight.
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel widths (pixels,
            intensity levels) and Potts weight.
        iterations: mean-field iterations.

    Returns:
        (B, L, H, W) float32 marginals ``Q``; the refined labels are ``Q.argmax(1)``.
    """
    _check_image(image)
    if unary.ndim != 4 or tuple(unary.shape[2:]) != tuple(image.shape[:2]):
        raise ValueError(
            f"unary must be (B, L, H, W) with (H, W) = {tuple(image.shape[:2])}, "
            f"got shape {tuple(unary.shape)}"
        )
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    batch, labels, height, width = unary.shape
    pairwise = PairwiseKernels(
        image,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
    )
    # (B, L, H, W) -> (P, B * L): pixels are the lattice points, the CRFs and labels its channels
    neg_unary = -unary.to(torch.float32).reshape(batch * labels, -1).t()
    q = _label_softmax(neg_unary, batch, labels)
    for _ in range(iterations):
        energy = neg_unary + pairwise(q)
        q = _label_softmax(energy, batch, labels)
    return q.t().reshape(batch, labels, height, width)


def _label_softmax(energy: torch.Tensor, batch: int, labels: int) -> torch.Tensor:
    """Softmax over the labels of (P, B * L) channels."""
    return torch.softmax(energy.view(-1, batch, labels), dim=2).view(-1, batch * labels)


def binary_dense_crf(
    image: torch.Tensor, masks: torch.Tensor, params: RefineConfig | None = None
) -> torch.Tensor:
    """Refine binary masks with a 2-label dense CRF each, as FreeSeg-Diff does with pydensecrf.

    Equivalent to :func:`dense_crf` with the unary of :func:`unary_from_masks`, but filters one
    channel per mask instead of two: with ``x = log Q_1 - log Q_0`` the update is
    ``x = U_0 - U_1 + sum_k compat_k * (2 K_k Q_1 - K_k 1)``.

    Args:
        image: (H, W, 3) uint8 or float RGB (0..255), on the device to compute on.
        masks: (N, H, W) bool coarse masks, on the same device.
        params: the CRF's parameters (the CRF fields of :class:`RefineConfig`); None: the
            released ones.

    Returns:
        (N, H, W) bool, the pixels whose label 1 marginal is strictly the larger (the
        reference's argmax keeps label 0 on ties).
    """
    params = params or RefineConfig()
    _check_image(image)
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(image.shape[:2]):
        raise ValueError(
            f"masks must be (N, H, W) with (H, W) = {tuple(image.shape[:2])}, "
            f"got shape {tuple(masks.shape)}"
        )
    count, height, width = masks.shape
    if count == 0:
        return masks.to(torch.bool).clone()
    pairwise = PairwiseKernels(
        image,
        gaussian_sxy=params.gaussian_sxy,
        gaussian_compat=params.gaussian_compat,
        bilateral_sxy=params.bilateral_sxy,
        bilateral_srgb=params.bilateral_srgb,
        bilateral_compat=params.bilateral_compat,
    )
    unary = unary_from_masks(masks, params.gt_prob)
    logit = (unary[:, 0] - unary[:, 1]).reshape(count, -1).t().contiguous()  # (P, N)
    # Everything but the 2 K Q_1 term, that is U_0 - U_1 - sum_k compat_k K_k 1: (P, N)
    ones = torch.ones(height * width, 1, dtype=torch.float32, device=masks.device)
    offset = logit - pairwise(ones)
    for _ in range(params.iterations):
        logit = torch.add(offset, pairwise(torch.sigmoid(logit)), alpha=2.0)
    return (logit > 0).t().reshape(count, height, width)
