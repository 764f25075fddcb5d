"""The Ray side: the driver that starts a run on a Ray cluster (`driver.py`), what each Ray
Train worker runs (`worker.py`), multi-worker `ddetr eval` (`eval_workers.py`), Ray Tune
sweeps (`tune.py`, `sweep_file.py`) and which failures Ray retries (`failures.py`). Below it:
`engine/` (the per-worker loop, no Ray), `models/`, `data/`, `ops/` and `comm.py`."""
