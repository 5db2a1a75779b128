import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from srupp.train import train

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg_path, out, mode: str) -> None:
    port = _free_port()
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
        }
        cmd = [sys.executable, "-c", WORKER, str(cfg_path), str(out), mode]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
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
        _launch(tmp_path / "cfg.json", tmp_path, mode)
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
