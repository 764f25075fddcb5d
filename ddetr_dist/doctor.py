"""Report what a run depends on here, to paste into a bug report: versions, where
ddetr_dist is imported from, GPUs, the attention op's build, the Ray cluster at --address
(or RAY_ADDRESS) and the file system under --output-dir. A report, not a gate: it exits 0
and ends with a `problem:` line for each thing to fix. Builds nothing unless --build-op."""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import urlsplit

from ddetr_dist.storage import Store, StoreError, is_uri

MOUNTS_FILE = "/proc/mounts"
SHARED_FS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs", "cifs", "smb3", "wekafs"}
LOCAL_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "overlay", "tmpfs", "ramfs", "vfat"}
WHERE = {"shared": "shared", "local": "local to this machine: other nodes will not see it",
         "unknown": "shared only if every node mounts it at this path"}
# ray.init runs in a child that a timeout stops: at a port that answers but is no Ray GCS, it retries for minutes
NODES_SCRIPT = """import json, logging, sys, ray
try:
    ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
    print(json.dumps({"nodes": [{"address": n["NodeManagerAddress"], "alive": n["Alive"],
        "head": "node:__internal_head__" in n["Resources"],
        **{k: n["Resources"].get(k, 0) for k in ("CPU", "GPU", "memory")}} for n in ray.nodes()]}))
except Exception as error:  # Ray's "Failed to connect" hides an auth failure in its causes
    causes, cause = [], error
    while cause is not None:
        causes, cause = causes + [f"{type(cause).__name__}: {cause}"], cause.__cause__
    print(json.dumps({"error": causes[0].splitlines()[0], "auth": any("AuthToken" in c for c in causes)}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""),
                        help="the Ray cluster to list (HEAD:6379 or ray://HEAD:10001; default: RAY_ADDRESS)")
    parser.add_argument("--output-dir", default="", help="the output_dir runs will write to: exists, writable, shared?")
    parser.add_argument("--build-op", action="store_true",
                        help="build the MSDA op if needed (about a minute) and run it once against the reference")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the Ray cluster (default 30)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def origin() -> dict:
    """ddetr_dist's version and where it is imported from. Installed means metadata in
    site-packages (not a checkout's stray egg-info); code imported from elsewhere (a Ray
    job's working_dir) is not what that metadata describes: its own __version__ counts."""
    import ddetr_dist

    here = Path(ddetr_dist.__file__).resolve().parent
    sites = {Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}
    dist = next((d for d in metadata.distributions(name="ddetr_dist")
                 if Path(d.locate_file("")).resolve() in sites), None)
    # an editable install maps the package to its checkout, in setuptools' finder or in a .pth
    editable = "".join(f.read_text() or "" for f in ((dist.files or []) if dist else [])
                       if f.name.startswith("__editable__") and f.suffix in (".py", ".pth"))
    if dist and here == Path(dist.locate_file("ddetr_dist")).resolve():
        return {"version": dist.version, "file": str(here), "kind": "installed package"}
    if dist and (f"'{here}'" in editable or f"{here.parent}\n" in editable + "\n"):
        return {"version": dist.version, "file": str(here), "kind": "editable install of a checkout"}
    shadowing = f"shadowing the installed ddetr_dist {dist.version}" if dist else "not installed"
    return {"version": ddetr_dist.__version__, "file": str(here),
            "kind": f"a working_dir or sys.path folder, {shadowing}"}


def version_line() -> str:
    others = ", ".join(f"{name} {dist_version(name)}" for name in ("torch", "ray", "deepspeed"))
    return f"ddetr {origin()['version']} ({others})"


def versions() -> dict:
    import torch

    return {"ddetr_dist": origin(), "python": platform.python_version(), "python_executable": sys.executable,
            "torch": torch.__version__, "cuda": torch.version.cuda, "ray": dist_version("ray"),
            "deepspeed": dist_version("deepspeed"),
            "host": f"{socket.gethostname()} ({platform.system()} {platform.machine()})"}


def gpus(problems: list[str]) -> dict:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    why = "" if props else "this torch is a CPU-only build" if torch.version.cuda is None else (
        f"torch sees no CUDA device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if why and Path("/dev/nvidiactl").exists():  # the NVIDIA driver is loaded: the GPUs are there
        problems.append(f"this machine has NVIDIA GPUs but {why}: install a CUDA torch, or check the driver")
    return {"count": len(props), "why_none": why, "devices": [
        {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
        for p in props]}


def _load_built(library: Path) -> tuple[object, str]:
    """The built extension, loaded from its .so as torch loads it after a build (never
    starting a compile); (None, why) when it is not built or does not load."""
    import importlib.util

    if not library.is_file():
        return None, "not built yet (it builds on first use, about a minute per node; or: ddetr doctor --build-op)"
    try:
        spec = importlib.util.spec_from_file_location(library.stem, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, "built, loads"
    except Exception as error:  # noqa: BLE001 - a broken .so raises ImportError, OSError, ...
        return None, f"built but does not load: {type(error).__name__}: {error}"


def op_state(build_op: bool, have_gpus: bool, problems: list[str]) -> dict:
    from ddetr_dist.ops import build, dispatch

    cuda_ok, why_not = build.cuda_build_possible()
    if have_gpus and not cuda_ok:  # dispatch then raises for GPU tensors rather than run the slow reference
        problems.append(f"GPUs, but the MSDA op's CUDA kernels cannot be built ({why_not}): training on GPUs will "
                        "fail; or choose the slow reference with DDETR_MSDA_BACKEND=torch")
    requested = os.environ.get(dispatch.ENV_VAR, "").strip().lower() or "auto"
    if requested not in dispatch.CHOICES:
        problems.append(f"{dispatch.ENV_VAR}={requested!r} is not a backend: use one of {', '.join(dispatch.CHOICES)}")
    state = {"requested": requested, "cuda_kernels_buildable": cuda_ok, "why_not": why_not, "folder": "",
             "kernels": "", "runs": {}}
    try:
        folder = build.build_folder()
    except OSError as error:  # an installed wheel without csrc/msda
        problems.append(f"the MSDA op's sources are missing ({error}): the slow torch backend will run")
        return {**state, "state": "no sources"}
    if build_op:  # build, then run once against the reference (a wrong GPU architecture fails only there)
        try:
            build.check("cuda" if have_gpus else "cpu", run=True)
        except (build.BuildError, RuntimeError) as error:
            problems.append(f"the MSDA op cannot be used: {str(error).splitlines()[0]}")
    extension, text = _load_built(folder / f"{folder.name}.so")
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    if extension is None and text.startswith("built"):
        problems.append(f"the MSDA op is {text}: remove {folder} so that it is rebuilt")
    elif extension is None and not compiler:
        problems.append("no C++ compiler (c++ or $CXX): the MSDA op cannot be built; install g++")
    kernels = "" if extension is None else "CPU + CUDA kernels" if extension.with_cuda else "CPU kernels"
    # what backend="auto" picks (dispatch.resolve_backend, without building): compiled, else torch
    compiled = {"cpu": extension is not None or text.startswith("not built") and bool(compiler)}
    if have_gpus:
        compiled["cuda"] = bool(extension.with_cuda) if extension is not None else cuda_ok
    runs = {device: requested if requested != "auto" else device if ok else
            "torch (slow)" if device == "cpu" else "an error (no CUDA kernels)" for device, ok in compiled.items()}
    return {**state, "state": text, "kernels": kernels, "folder": str(folder), "runs": runs}


def auth_state(problems: list[str]) -> dict:
    """Ray's token authentication as a client here would present it; never the token."""
    files = [os.environ["RAY_AUTH_TOKEN_PATH"]] if os.environ.get("RAY_AUTH_TOKEN_PATH") else []
    if files and not Path(files[0]).is_file():
        problems.append(f"RAY_AUTH_TOKEN_PATH={files[0]} is not a file")
    token = "in RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN", "").strip() else next(
        (f"in {f}" for f in files + [str(Path.home() / ".ray" / "auth_token")] if Path(f).is_file()), "none found")
    mode = os.environ.get("RAY_AUTH_MODE", "") or "unset: a driver sends no token"
    return {"mode": mode, "token": token}


def ray_state(address: str, timeout: float, problems: list[str]) -> dict:
    state = {"address": address, "auth": auth_state(problems), "nodes": [], "note": ""}
    if not address:
        return {**state, "note": "not checked (no --address, no RAY_ADDRESS)"}
    scheme, _, rest = address.rpartition("://")
    host = (urlsplit("//" + rest).hostname or "") if address != "auto" else ""
    try:  # a closed port fails here at once, where Ray would retry for a minute
        if host:
            if urlsplit("//" + rest).port is None:
                raise ValueError("no port in the address: give HEAD:6379 or ray://HEAD:10001")
            socket.create_connection((host, urlsplit("//" + rest).port), timeout=3).close()
        if scheme in ("http", "https"):
            return {**state, "note": "a dashboard address (for ray job submit): reachable; "
                                     "give HEAD:6379 to list the nodes"}
        done = subprocess.run([sys.executable, "-c", NODES_SCRIPT, address], capture_output=True, text=True,
                              timeout=timeout)
        answer = json.loads(([""] + [x for x in done.stdout.splitlines() if x.startswith("{")])[-1] or "{}")
        error = answer.get("error", "" if answer else f"the check exited {done.returncode}: {done.stderr[-300:]}")
    except (OSError, ValueError) as failed:
        answer, error = {}, f"cannot connect ({failed})"
    except subprocess.TimeoutExpired:
        answer, error = {}, f"no answer within {timeout:g} s (is it the GCS port, HEAD:6379, or ray://HEAD:10001?)"
    if error:
        routable = host and not host.startswith(("127.", "localhost", "::1"))
        # Ray's own answer (not a closed port) from a routable address: token auth is likely why
        wanted = answer.get("auth") or (routable and "error" in answer and os.environ.get("RAY_AUTH_MODE") != "token")
        hint = ("; a cluster with token auth (Ray's default off localhost) wants RAY_AUTH_MODE=token and its token "
                f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; here: {state['auth']['token']})")
        refused = " (authentication failed)" if answer.get("auth") else ""
        problems.append(f"Ray cluster {address}: {error}{refused}{hint if wanted else ''}")
    return {**state, "nodes": answer.get("nodes", [])}


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, file system type) of the longest mount point holding path."""
    best = ("/", "unknown")
    try:
        table = [line.split() for line in Path(MOUNTS_FILE).read_text().splitlines()]
    except OSError:  # not Linux
        return best
    for fields in (f for f in table if len(f) >= 3):
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # \040 is a space
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, fields[2])  # >=: of mounts stacked on one point, the last is on top
    return best


def output_dir_state(path: str, nodes: int, problems: list[str]) -> dict:
    if not path:
        return {"path": path, "note": "not given (--output-dir)"}
    if is_uri(path):  # object storage: can this machine write there (credentials, bucket, endpoint)
        try:
            Store(path).check_writable("output_dir")
        except StoreError as error:
            problems.append(str(error))
            return {"path": path, "note": "object storage, not writable from here"}
        return {"path": path, "note": "object storage, writable from here"}
    real = os.path.realpath(path)
    mount, fs = mount_of(real)
    kind = "shared" if fs in SHARED_FS else "local" if fs in LOCAL_FS else "unknown"
    state = {"path": real, "exists": os.path.isdir(real), "writable": False, "fs": fs, "mount": mount, "kind": kind}
    probe = Path(real) / f".ddetr-doctor-{socket.gethostname()}-{os.getpid()}"
    try:  # the one test that counts: permissions, read-only mounts, quotas and root squash all show here
        probe.write_text("probe")
        probe.unlink()
        state["writable"] = True
    except OSError as error:
        problems.append(f"output_dir {real} " + (f"is not writable here: {error}" if state["exists"] else
                        "does not exist (or is not a folder): create it, on storage every node mounts"))
    if kind == "local" and nodes > 1:
        problems.append(f"output_dir {real} is on {fs}, local to this machine, but the cluster has {nodes} nodes: "
                        "use a file system every node mounts (NFS, Lustre, ...)")
    return state


def render(report: dict) -> list[str]:
    v, g, op, ray, out = (report[key] for key in ("versions", "gpus", "op", "ray", "output_dir"))
    ours = v["ddetr_dist"]
    rows = [("ddetr_dist", f"{ours['version']}  {ours['file']}  ({ours['kind']})"),
            ("python", f"{v['python']}  {v['python_executable']}"), ("torch", v["torch"]),
            ("CUDA", v["cuda"] or "none (a CPU-only torch)"), ("ray", v["ray"]), ("deepspeed", v["deepspeed"]),
            ("host", v["host"]), ("GPUs", str(g["count"]) if g["count"] else f"none: {g['why_none']}")]
    rows += [(f"  GPU {i}", f"{d['name']}, {d['memory_gib']} GiB, capability {d['capability']}")
             for i, d in enumerate(g["devices"])]
    rows += [("MSDA op", op["state"] + (f": {op['kernels']}" if op["kernels"] else "")),
             ("  build folder", op["folder"]),
             ("  backend", f"{op['requested']} (DDETR_MSDA_BACKEND): " + ", ".join(
                 f"{device} tensors run {name}" for device, name in op["runs"].items())),
             ("  CUDA kernels", "can be built" if op["cuda_kernels_buildable"] else
              f"cannot be built: {op['why_not']}"),
             ("Ray cluster", ray["address"] or ray["note"]),
             ("  auth", f"RAY_AUTH_MODE {ray['auth']['mode']}; token: {ray['auth']['token']}")]
    rows += [("  note", ray["note"])] if ray["address"] and ray["note"] else []
    rows += [("  node", f"{n['address']}: " + ("head, " if n["head"] else "") + ("alive" if n["alive"] else "dead")
              + f", {n['CPU']:g} CPU, {n['GPU']:g} GPU, {n['memory'] / 2**30:.1f} GiB memory") for n in ray["nodes"]]
    if "note" in out:
        rows.append(("output_dir", f"{out['path']} ({out['note']})" if out["path"] else out["note"]))
    else:
        status = "writable" if out["writable"] else "exists, not writable" if out["exists"] else "does not exist"
        rows += [("output_dir", f"{out['path']}: {status}"),
                 ("  file system", f"{out['fs']} at {out['mount']}: {WHERE[out['kind']]}")]
    lines = [f"{label:<16}{value}" for label, value in rows]
    return lines + [f"problem: {p}" for p in report["problems"]] + ([] if report["problems"] else ["no problems found"])


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    report = {"versions": versions(), "gpus": gpus(problems)}
    report["op"] = op_state(args.build_op, report["gpus"]["count"] > 0, problems)
    report["ray"] = ray_state(args.address, args.timeout, problems)
    report["output_dir"] = output_dir_state(args.output_dir, len(report["ray"]["nodes"]), problems)
    report["problems"] = problems
    text = json.dumps(report, indent=2) if args.json else "\n".join(render(report))
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    print(text.replace(token, "<RAY_AUTH_TOKEN>") if token else text)  # should an error ever quote it
    return 0
