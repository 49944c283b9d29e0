"""The launch command line and the per-rank batch: pure functions, checked against torchrun's own parser."""

from __future__ import annotations

import pytest

from qlora_app.errors import UserError
from qlora_app.plan.layout import per_rank_grad_accum
from qlora_app.train.distributed import GRACE_SECONDS, RANK_MODULE, Nodes, torchrun_args, torchrun_command


def parsed(args: list[str]):
    from torch.distributed.run import parse_args

    return parse_args(args)


def test_one_node_is_standalone_and_quiet_below_rank_0():
    args = torchrun_args(4, Nodes(), ["/runs/tiny/x", "/runs/tiny/x/checkpoints/checkpoint-6"], "/runs/tiny/x/logs")
    ns = parsed(args)
    assert ns.standalone and ns.nnodes == "1" and ns.nproc_per_node == "4"
    assert ns.module and ns.training_script == RANK_MODULE
    assert ns.training_script_args == ["/runs/tiny/x", "/runs/tiny/x/checkpoints/checkpoint-6"]
    assert ns.redirects == "1:3,2:3,3:3" and ns.log_dir == "/runs/tiny/x/logs"  # local rank 0 keeps the terminal
    assert ns.max_restarts == 0 and ns.shutdown_timeout == GRACE_SECONDS


def test_one_rank_redirects_nothing():
    ns = parsed(torchrun_args(1, Nodes(), ["/r"], "/r/logs"))
    assert ns.redirects == "0" and ns.nproc_per_node == "1"


def test_several_nodes_meet_at_node_0():
    nodes = Nodes(count=2, rank=1, addr="10.0.0.5", port=29600)
    ns = parsed(torchrun_args(8, nodes, ["/shared/runs/r"], "/shared/runs/r/logs"))
    assert not ns.standalone
    assert (ns.nnodes, ns.node_rank, ns.master_addr, ns.master_port) == ("2", 1, "10.0.0.5", 29600)
    command = torchrun_command(8, nodes, ["/shared/runs/r"], "/shared/runs/r/logs", python="python")
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--node-rank 1 --master-addr 10.0.0.5 --master-port 29600" in " ".join(command)


def test_several_nodes_need_an_address():
    with pytest.raises(UserError, match="--master-addr"):
        torchrun_args(8, Nodes(count=2), ["/r"], "/r/logs")


@pytest.mark.parametrize(("grad_accum", "ranks", "per_rank"), [(4, 1, 4), (4, 2, 2), (4, 4, 1), (8, 4, 2)])
def test_grad_accum_is_divided_to_keep_the_update(grad_accum, ranks, per_rank):
    assert per_rank_grad_accum(grad_accum, ranks) == per_rank


def test_grad_accum_that_cannot_be_split_is_refused():
    with pytest.raises(UserError, match=r"train.grad_accum=4 cannot be split over 3 ranks"):
        per_rank_grad_accum(4, 3)


def test_train_refuses_a_batch_it_cannot_keep_before_anything_loads(tmp_path):
    from conftest import assert_one_line_error, cli_in_process

    result = cli_in_process("train", "tiny", "--runs-dir", str(tmp_path), "--gpus", "2")  # tiny: grad_accum 1
    assert_one_line_error(result, "train.grad_accum=1 cannot be split over 2 ranks")
    assert not (tmp_path / "tiny").exists()


def test_plan_refuses_the_gpu_count_train_would_refuse():
    """llama3-8b keeps 16 rows per update with grad_accum 4: 3 GPUs cannot share that, in plan as in train."""
    from conftest import assert_one_line_error, cli_in_process

    assert_one_line_error(cli_in_process("plan", "llama3-8b", "--gpus", "3"), "train.grad_accum=4 cannot be split over 3")


def test_fsdp_recipe_shards_the_4bit_base_with_low_ram_loading(monkeypatch):
    import torch

    from qlora_app.model.loading import quantization_config
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.train.distributed import fsdp_args

    recipe = load_recipe("llama3-70b")
    assert recipe.train.distributed == "fsdp"
    assert quantization_config(recipe).bnb_4bit_quant_storage == torch.bfloat16  # shards like the bf16 weights
    assert quantization_config(load_recipe("llama3-8b")).bnb_4bit_quant_storage == torch.uint8  # ddp: as before
    assert fsdp_args(recipe) == {}  # one process: nothing to shard
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = fsdp_args(recipe)
    assert args["fsdp"] is True
    assert args["fsdp_config"] == {"version": 2, "cpu_ram_efficient_loading": True, "reshard_after_forward": True}
    assert fsdp_args(load_recipe("llama3-8b")) == {}  # ddp


@pytest.mark.parametrize("gpus", ["²", "0", "two", "-1", "١"])
def test_a_gpu_count_that_is_not_a_plain_number_is_one_line(gpus):
    from qlora_app.train.launch import gpu_count

    with pytest.raises(UserError, match=r"give a number of GPUs"):
        gpu_count(gpus, visible=None)


def test_superscript_gpu_count_is_one_line_before_a_run_directory(tmp_path):
    from conftest import assert_one_line_error, cli_in_process

    assert_one_line_error(cli_in_process("train", "tiny", "--runs-dir", str(tmp_path), "--gpus", "²"), "--gpus ²")
    assert not any(tmp_path.iterdir())


def test_more_gpus_than_visible_are_refused():
    from qlora_app.train.launch import gpu_count

    with pytest.raises(UserError, match=r"--gpus 4: only 2 GPUs are visible"):
        gpu_count("4", visible=2)
    assert gpu_count("2", visible=2) == 2 and gpu_count("all", visible=2) == 2
    assert gpu_count("4", visible=None) == 4  # no CUDA: CPU ranks with gloo, as many as asked


@pytest.mark.parametrize(("ranks", "per_node", "flags"), [
    (1, 1, ""), (2, 2, " --gpus 2"), (16, 8, " --gpus 8 --nodes 2"), (2, 1, " --gpus 1 --nodes 2")])
def test_resume_advice_names_gpus_per_node_and_nodes(ranks, per_node, flags):
    from qlora_app.train.distributed import launch_flags

    assert launch_flags(ranks, per_node) == flags


def test_several_nodes_without_an_address_are_refused_before_a_run_directory(tmp_path):
    from conftest import assert_one_line_error, cli_in_process

    result = cli_in_process("train", "tiny", "--runs-dir", str(tmp_path), "--nodes", "2", "--set", "train.grad_accum=2")
    assert_one_line_error(result, "--master-addr")
    assert not any(tmp_path.iterdir())


def test_the_command_for_other_nodes_can_be_pasted_into_a_shell():
    import shlex

    from qlora_app.train.distributed import node_command

    layout = '{"batch_size": 4, "grad_accum": 2, "gradient_checkpointing": true, "reason": "batch_size auto: 4 x 2"}'
    nodes = Nodes(count=2, rank=1, addr="10.0.0.5")
    args = ["/shared/runs/my run", layout]
    line = node_command(8, nodes, args, "/shared/runs/my run/logs")
    assert shlex.split(line) == torchrun_command(8, nodes, args, "/shared/runs/my run/logs")


def test_a_rank_given_a_mangled_layout_leaves_its_one_line_error(tmp_path):
    """What a rank got from an unquoted paste: its failure is recorded for the launcher, not a traceback."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, "-m", RANK_MODULE, str(tmp_path), "{batch_size:"], capture_output=True,
                            text=True, cwd=REPO, env=os.environ, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    stamp_and_code, message = (tmp_path / "logs" / "rank-0.error").read_text().splitlines()[:2]
    assert stamp_and_code.split()[1] == "1" and message.startswith("JSONDecodeError")


def test_a_session_does_not_report_an_earlier_session_s_rank_error(tmp_path):
    """An interruption left rank-0.error behind; this session's rank dies without a word (json.tool, exit 2):
    its own exit is reported, not the old SIGTERM (exit 143)."""
    from qlora_app.run.directory import RunDir
    from qlora_app.train.launch import RankFailed, run_ranks

    run = RunDir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank-0.error").write_text("1 143\ntraining stopped by SIGTERM at step 5\n")
    silent_failure = ["--standalone", "--nnodes", "1", "--nproc-per-node", "1", "--max-restarts", "0",
                      "--log-dir", str(tmp_path / "logs"), "--module", "json.tool", str(tmp_path / "missing.json")]
    with pytest.raises(RankFailed, match="rank 0 ended with exit code 2 before it could say why") as failed:
        run_ranks(silent_failure, run)
    assert failed.value.exit_code == 1
