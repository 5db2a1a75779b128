import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from srupp.train import train

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from srupp.train import TrainConfig, train
    cfg = TrainConfig.from_json(open(sys.argv[1]).read())
    result = train(cfg)
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


@pytest.mark.slow
def test_ddp_two_cpu_ranks_match_one_process(tiny_cfg, tmp_path):
    # dropout 0 so both runs see the same function; global batch 4 = 2 ranks x 2 streams.
    cfg = tiny_cfg(max_steps=4, eval_every=4, dropout=0.0, attn_dropout=0.0, batch_size=4)
    single = train(cfg)
    ddp_cfg = tiny_cfg(max_steps=4, eval_every=4, dropout=0.0, attn_dropout=0.0, batch_size=4, out_dir=tmp_path / "ddp")
    (tmp_path / "cfg.json").write_text(ddp_cfg.to_json())
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, "-c", WORKER, str(tmp_path / "cfg.json"), str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    params = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for name, value in params[0].items():
        assert torch.equal(value, params[1][name]), f"{name} differs across ranks"
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    reference = single.model.state_dict()
    for name, value in params[0].items():
        assert torch.allclose(value, reference[name], atol=1e-5, rtol=1e-4), name
