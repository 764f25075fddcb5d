"""What reaches the console: our lines, not the libraries' chatter a person cannot act on.
Ray Train's per-rank reports, DeepSpeed's info lines and torch's deprecation warnings from
inside DeepSpeed go quiet; `DDETR_VERBOSE=1` brings them all back."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Iterator

VERBOSE_ENV = "DDETR_VERBOSE"
# Ray Train reads these once, in every worker: its patched print would send every print,
# also those inside contextlib.redirect_stdout (pycocotools' progress), to the console
RAY_QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# the logger of Ray's notice that a local Ray turned token authentication on (quiet_local_ray)
RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
# torch deprecates the collectives DeepSpeed's ZeRO calls; nothing a user can change
TORCH_DEPRECATIONS = r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_train_log_level() -> str:
    """Ray Train's own loggers (`ray.train`, in the driver's controller and the workers):
    its per-report and per-checkpoint INFO lines repeat what our lines say."""
    return "INFO" if verbose() else "WARNING"


def quiet_local_ray() -> None:
    """Before a local Ray starts for a run: Ray's WARNING that it turned token authentication
    on (a token exists in ~/.ray) asks the user to opt out; this Ray listens on 127.0.0.1
    only, for this run, so there is nothing to act on. No-op with DDETR_VERBOSE=1."""
    if not verbose():
        logging.getLogger(RAY_AUTH_SETUP_LOGGER).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """In each worker (and any process running the engine): DeepSpeed at WARNING, torch's
    deprecations of DeepSpeed's collectives off. No-op with DDETR_VERBOSE=1."""
    if verbose():
        return
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=TORCH_DEPRECATIONS, category=FutureWarning)


@contextlib.contextmanager
def without_library_prints() -> Iterator[None]:
    """Drops what a library call prints to stdout (DeepSpeed's initialize prints a bare
    "deepspeed_shm_comm_op built successfully" per rank); its logging and errors still pass.
    Kept with DDETR_VERBOSE=1."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
