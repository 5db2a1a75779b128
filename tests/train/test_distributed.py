import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from srupp.train import load_checkpoint, train

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from srupp.train import TrainConfig, train
    cfg = TrainConfig.from_json(open(sys.argv[1]).read())
    result = train(cfg, resume=sys.argv[3] == "resume")
    rank = int(os.environ["RANK"])
    weights = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(weights, f"{sys.argv[2]}/rank{rank}.safetensors")
    json.dump(result.losses, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
    """
)


COUNTING_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from srupp.train import TrainConfig, loop, train
    from tests.train.host_sync import host_reads_per_update
    cfg = TrainConfig.from_json(open(sys.argv[1]).read())
    with host_reads_per_update(loop) as per_update:
        train(cfg)
    json.dump(per_update, open(f"{sys.argv[2]}/rank{os.environ['RANK']}.json", "w"))
    """
)


_PORTS_GIVEN: set[int] = set()


def _free_port() -> int:
    """A port free now and never handed out before in this process (two process groups started back to back
    must not draw the same one before either binds it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def _start_ranks(*args: str) -> list[subprocess.Popen]:
    """``python *args`` as the two ranks of a torchrun-like process group on this machine; the repository root is
    on the path (for ``tests.train.host_sync``)."""
    port = _free_port()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": path,
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _launch(worker: str, cfg_path, out, mode: str = "new") -> None:
    procs = _start_ranks("-c", worker, str(cfg_path), str(out), mode)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs


def _tensor_bytes(path) -> dict[str, int]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118


@pytest.mark.slow
def test_ddp_two_cpu_ranks_match_one_process_and_resume_exactly(tiny_cfg, tmp_path):
    # dropout 0 so both runs see the same function; global batch 4 = 2 ranks x 2 streams. The DDP run stops
    # at step 2 and is resumed to step 4 (each rank from its own carried-state file).
    common = {"eval_every": 2, "dropout": 0.0, "attn_dropout": 0.0, "batch_size": 4, "schedule_steps": 4}
    single = train(tiny_cfg(**common, max_steps=4))
    for mode, steps in (("new", 2), ("resume", 4)):
        ddp_cfg = tiny_cfg(**common, max_steps=steps, out_dir=tmp_path / "ddp")
        (tmp_path / "cfg.json").write_text(ddp_cfg.to_json())
        _launch(WORKER, tmp_path / "cfg.json", tmp_path, mode)
        losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
        assert losses[0] == losses[1]
        assert losses[0] == pytest.approx(single.losses[steps - 2 : steps], rel=1e-5, abs=1e-6), mode
    params = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    reference = single.model.state_dict()
    for name, value in params[0].items():
        assert torch.equal(value, params[1][name]), f"{name} differs across ranks"
        assert torch.allclose(value, reference[name], atol=1e-5, rtol=1e-4), name

    # The shared checkpoint holds the same tensors for 1 and 2 ranks; each rank's carried state is its own file.
    one, two = tmp_path / "run" / "checkpoints", tmp_path / "ddp" / "checkpoints"
    assert _tensor_bytes(one / "last.safetensors") == _tensor_bytes(two / "last.safetensors")
    assert abs((one / "last.safetensors").stat().st_size - (two / "last.safetensors").stat().st_size) < 64
    assert sorted(p.name for p in two.glob("last.*.rank*")) == [f"last.step4.rank{r}.safetensors" for r in range(2)]
    carry = [load_file(two / f"last.step4.rank{r}.safetensors") for r in range(2)]
    assert carry[0]["carry/c"].shape == carry[1]["carry/c"].shape == (2, 2, 32)  # [layers, this rank's B, d]
    assert not torch.equal(carry[0]["carry/c"], carry[1]["carry/c"])  # different streams, different state


@pytest.mark.slow
def test_ddp_updates_between_stop_checks_and_logs_never_read_the_device(tiny_cfg, tmp_path):
    """Under DDP too, only log steps and the ranks' stop checks read values on the host; the loss is averaged over
    the ranks when it is read. Each rank counts per loop iteration, as the one-process test does."""
    cfg = tiny_cfg(max_steps=8, eval_every=100, log_every=4, stop_check_every=3, out_dir=tmp_path / "ddp")
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    _launch(COUNTING_WORKER, tmp_path / "cfg.json", tmp_path)
    for rank in range(2):
        per_step = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(per_step) == 8, per_step
        quiet = [tuple(counts) for step, counts in enumerate(per_step, 1) if step % 4 and step % 3]
        assert quiet == [(0, 0)] * 4, (rank, per_step)  # steps 1, 2, 5, 7
        checked = [sum(counts) for step, counts in enumerate(per_step, 1) if step % 4 == 0 or step % 3 == 0]
        assert all(checked), (rank, per_step)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_next_stop_check_with_one_checkpoint_and_resumes_exactly(
    tiny_cfg, tmp_path
):
    """A SIGTERM to rank 1 alone: both ranks stop at the same step (the next multiple of ``stop_check_every``),
    save it once and exit with 143, each with one line naming that step. ``--resume`` then logs the losses an
    uninterrupted 2-rank run of the same config logs (dropout on: each rank's RNG comes back too)."""
    run = tmp_path / "ddp"
    common = {"eval_every": 100_000, "schedule_steps": 100_000, "stop_check_every": 5}  # max_steps moves no lr
    cfg = tiny_cfg(**common, max_steps=100_000, out_dir=run)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    procs = _start_ranks("-m", "srupp", "train", "--config", str(tmp_path / "cfg.json"))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [p.communicate() for p in procs]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], errors
    step = load_checkpoint(run / "checkpoints" / "last.safetensors").trainer["step"]
    assert step % 5 == 0 and step >= 3
    for err in errors:
        assert err.strip().splitlines() == [
            f"srupp train: stopped by SIGTERM: step {step} saved in {run / 'checkpoints' / 'last.safetensors'}; "
            f"continue with `srupp train --resume {run}`"
        ]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged[-1] == step  # every update that was logged is in the checkpoint
    ranks = sorted(p.name for p in (run / "checkpoints").glob("last.*.rank*"))
    assert ranks == [f"last.step{step}.rank{r}.safetensors" for r in range(2)]

    # The resume and the uninterrupted reference (its losses written by WORKER) run side by side, two steps past.
    whole = tiny_cfg(**common, max_steps=step + 2, out_dir=tmp_path / "whole")
    (tmp_path / "whole.json").write_text(whole.to_json())
    procs = _start_ranks("-m", "srupp", "train", "--resume", str(run), "--max_steps", str(step + 2))
    procs += _start_ranks("-c", WORKER, str(tmp_path / "whole.json"), str(tmp_path), "new")
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    reference = json.loads((tmp_path / "rank0.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, step + 3))
    assert [loss for _, loss in losses] == pytest.approx(reference, rel=1e-5, abs=1e-6)
