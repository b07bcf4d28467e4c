"""The machinery every layer may use: devices and dtypes (``devices.py``), loading models by
Hub id, folder or ``tiny:`` name (``hub.py``, ``weights.py``, ``tiny/``), optional extras
(``extras.py``), the stage timer (``timing.py``), the opt-in speed and memory tuning
(``tuning.py``, ``memory.py``, ``workers.py``: the CRF worker processes) and Ctrl-C/SIGTERM
handling (``interrupts.py``).

infra imports only the settings, results and errors, never a stage, io or an application
(tests/test_imports.py checks it).
"""
