"""The `qlora-app` command: parses arguments, then calls a stage. No logic lives here."""

from __future__ import annotations

import sys

import click

from qlora_app import __version__, console
from qlora_app.errors import UserError

SET_HELP = "Override a recipe value, e.g. --set train.lr=1e-4 --set lora.r=16 (repeatable)."


class App(click.Group):
    """Turns UserError into one red line on stderr and exit code 2: never a traceback for user mistakes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            console.error(str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.error("interrupted")
            sys.exit(130)
        except Exception as exc:  # a Hub failure that no stage translated is still one line
            from qlora_app.hub.diagnosis import explain

            line = explain(exc)
            if line is None:
                raise
            console.error(str(UserError(line)))
            sys.exit(UserError.exit_code)


def overrides_option(fn):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(fn)


def gpu_option(fn):
    return click.option(
        "--gpu-memory", type=click.FloatRange(min=1), default=24.0, show_default=True, metavar="GIB",
        help="GPU memory to plan for, in GiB.",
    )(fn)


def runs_dir_option(fn):
    return click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
                        help="Root of run directories (default: $QLORA_RUNS_DIR or ./runs).")(fn)


def listen_options(fn):
    fn = click.option("--allow-unauthenticated", is_flag=True,
                      help="Serve on a non-loopback address without QLORA_API_KEY (e.g. inside a container "
                           "whose port is published on the host's loopback only).")(fn)
    fn = click.option("--port", type=click.IntRange(1, 65535), default=None,
                      help="Port (default: the recipe's serve.port, 8000).")(fn)
    return click.option("--host", default=None, help="Address to bind (default: the recipe's serve.host, "
                                                     "127.0.0.1). Anything else needs QLORA_API_KEY.")(fn)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qlora-app")
def main() -> None:
    """QLoRA fine-tuning on one GPU: train, merge and serve 7-8B models from named recipes.

    Start with `qlora-app doctor` and `qlora-app recipes`, then `qlora-app plan RECIPE` to see whether it fits
    your GPU. QLORA_HOME=/workspace (a pod's volume) puts runs and every cache under that folder.
    """
    import os

    from qlora_app.hub.diagnosis import quiet_hub_logging
    from qlora_app.machine.home import home_environment

    os.environ.update(home_environment(os.environ))
    # trl's import sets VLLM_LOGGING_LEVEL=ERROR in os.environ unless it is set (trl/_compat.py): a vLLM server
    # started later by this process (pipeline, demo, doctor --smoke) would inherit it and log no INFO or WARNING
    # line. vLLM's own default, unless the user chose a level.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    quiet_hub_logging()


@main.command("recipes")
@gpu_option
def recipes_cmd(gpu_memory: float) -> None:
    """List the shipped recipes with their model, method and planned peak VRAM."""
    from qlora_app.plan.report import print_recipes

    print_recipes(gpu_memory)


@main.command("show")
@click.argument("recipe")
@overrides_option
def show_cmd(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved RECIPE (defaults filled in, overrides applied) as YAML.

    RECIPE is a name from recipes/ or a path to a YAML file.
    """
    from qlora_app.model.architecture import check_recipe
    from qlora_app.recipe.loader import dump_recipe, load_recipe

    resolved = load_recipe(recipe, overrides)
    check_recipe(resolved, offline_only=True)  # an unsupported family, found without asking the Hub
    console.out.print(dump_recipe(resolved), markup=False, highlight=False, end="")


@main.command("plan")
@click.argument("recipe")
@overrides_option
@gpu_option
@click.option("--compare", is_flag=True, help="Also show plain LoRA on a 16-bit base beside QLoRA.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Plan each GPU of N training together (train.distributed: fsdp shards the model over them).")
def plan_cmd(recipe: str, overrides: tuple[str, ...], gpu_memory: float, compare: bool, gpus: int) -> None:
    """Estimate peak GPU memory of training RECIPE before anything loads.

    Counts the 4-bit base with its quantization constants, the 16-bit parts, LoRA weights, gradients and
    optimizer state, activations (with and without gradient checkpointing), logits and CUDA overhead,
    then says whether it fits and the largest batch and sequence length that do.
    RECIPE is a name from recipes/ or a path to a YAML file.
    """
    from qlora_app.plan.report import print_plan
    from qlora_app.recipe.loader import load_recipe

    print_plan(load_recipe(recipe, overrides), gpu_memory, compare, gpus)


@main.command("train")
@click.argument("recipe")
@overrides_option
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[RUN_DIR]",
              help="Continue the latest run of RECIPE (or RUN_DIR) from its newest complete checkpoint.")
@click.option("--gpus", default="1", show_default=True, metavar="N|all",
              help="Ranks on this machine, one per GPU (on CPU: N processes with gloo), started by torchrun. "
                   "The recipe's sequences per optimizer update are kept: train.grad_accum is divided by the "
                   "number of ranks.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Machines taking part; this one is node 0 and prints the command for the others.")
@click.option("--master-addr", default=None, help="Address of node 0 as the other nodes reach it (--nodes > 1).")
@click.option("--master-port", type=click.IntRange(1, 65535), default=29500, show_default=True,
              help="Port on node 0 where the nodes meet (--nodes > 1).")
@runs_dir_option
def train_cmd(recipe: str, overrides: tuple[str, ...], resume: str | None, gpus: str, nodes: int,
              master_addr: str | None, master_port: int, runs_dir: str | None) -> None:
    """QLoRA-fine-tune RECIPE into runs/RECIPE/RUN_ID (adapter, tokenizer, metrics, manifest, loss curve).

    Data and recipe are validated before the model loads. Ctrl-C or SIGTERM saves a checkpoint and stops;
    --resume continues from the newest complete checkpoint. RECIPE is a name from recipes/ or a YAML path.
    """
    import os

    # Before torch touches the GPU: with expandable segments the allocator wastes about half as much
    # (docs/gpu-measurements.md), and the planner assumes it.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.run.directory import runs_root
    from qlora_app.train.distributed import Nodes
    from qlora_app.train.launch import train_stage

    train_stage(load_recipe(recipe, overrides), runs_root(runs_dir), resume, gpus,
                Nodes(nodes, 0, master_addr, master_port), as_started=not overrides)


@main.command("merge")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--recipe", "recipe_name", default=None, help="Merge the latest run of this recipe.")
@click.option("--base-weights", type=click.Choice(["auto", "original", "dequantized"]), default=None,
              help="Merge into the original 16-bit weights, or into dequant(NF4): the weights the adapter "
                   "was trained on; auto picks by held-out loss (default: the recipe's merge.base_weights).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare the merged model with base + adapter on held-out examples before publishing it "
                   "(loads the model a few times: on CPU an 8B check needs about 20 GB of RAM).")
@click.option("--set", "overrides", multiple=True, metavar="merge.KEY=VALUE",
              help="Override a merge setting of the run's recipe, e.g. --set merge.dtype=float16 (repeatable).")
@runs_dir_option
def merge_cmd(run_dir: str | None, recipe_name: str | None, base_weights: str | None, verify: bool,
              overrides: tuple[str, ...], runs_dir: str | None) -> None:
    """Merge a run's adapter into a standard 16-bit model in RUN_DIR/merged (default: the latest run of any
    recipe, or of --recipe).

    The base is streamed shard by shard, never loaded whole and never 4-bit; the result carries the training
    tokenizer, chat template and a generation config that stops at end-of-turn, and appears atomically.
    """
    from qlora_app.merge.stage import merge, merge_settings
    from qlora_app.run.directory import find_run, runs_root

    run = find_run(run_dir, recipe_name, runs_root(runs_dir))
    merge(run, merge_settings(run, overrides, base_weights), verify)


@main.command("serve")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--recipe", "recipe_name", default=None, help="Serve the latest run of this recipe.")
@click.option("--base", default=None, metavar="RECIPE",
              help="Adapter mode: serve this recipe's base model once, with adapters as their own model ids.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=RUN_DIR",
              help="Adapter mode: serve RUN_DIR's adapter as model NAME (repeatable; adds to serve.adapters).")
@overrides_option
@listen_options
@runs_dir_option
def serve_cmd(run_dir: str | None, recipe_name: str | None, base: str | None, adapters: tuple[str, ...],
              overrides: tuple[str, ...], host: str | None, port: int | None, allow_unauthenticated: bool,
              runs_dir: str | None) -> None:
    """Serve a trained run with vLLM's OpenAI-compatible server until Ctrl-C.

    Default: the merged model of RUN_DIR (or of the latest run of --recipe), under the recipe's name.
    With --base RECIPE and --adapter NAME=RUN_DIR ...: one base, each LoRA adapter its own model id.
    Set QLORA_API_KEY to require 'Authorization: Bearer <key>' on every route but /health.
    """
    from qlora_app.run.directory import runs_root
    from qlora_app.serve.stage import serve_command

    serve_command(run_dir, recipe_name, base, adapters, overrides, host, port, runs_root(runs_dir),
                  allow_unauthenticated)


@main.command("runs")
@click.option("--recipe", "recipe_name", default=None, help="Only the runs of this recipe.")
@runs_dir_option
def runs_cmd(recipe_name: str | None, runs_dir: str | None) -> None:
    """List the runs, newest first: status, steps, held-out loss, merge and eval (base vs tuned)."""
    from qlora_app.run.directory import runs_root
    from qlora_app.run.listing import runs_command

    runs_command(recipe_name, runs_root(runs_dir))


@main.command("eval")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--recipe", "recipe_name", default=None, help="Evaluate the latest run of this recipe.")
@click.option("--set", "overrides", multiple=True, metavar="eval.KEY=VALUE",
              help="Override an eval setting of the run's recipe, e.g. --set eval.limit=50 (repeatable).")
@runs_dir_option
def eval_cmd(run_dir: str | None, recipe_name: str | None, overrides: tuple[str, ...], runs_dir: str | None) -> None:
    """Base vs tuned on a run's held-out split (default: the latest run of any recipe, or of --recipe).

    One vLLM server serves the base and the run's adapter; greedy answers of at most eval.max_tokens are scored
    (exact match, ROUGE-L, chrF, share finished, length), and the lm-evaluation-harness tasks of eval.tasks run
    on both through the same server (delta and its standard error per task); all into RUN_DIR/eval.json and
    the merged model's card.
    """
    from qlora_app.eval.stage import eval_command
    from qlora_app.run.directory import runs_root

    eval_command(run_dir, recipe_name, overrides, runs_root(runs_dir))


@main.command("pipeline")
@click.argument("recipe")
@overrides_option
@listen_options
@runs_dir_option
def pipeline_cmd(recipe: str, overrides: tuple[str, ...], host: str | None, port: int | None,
                 allow_unauthenticated: bool, runs_dir: str | None) -> None:
    """Train, merge, evaluate (unless eval.enabled: false) and serve RECIPE; a stage whose outputs are already
    current is skipped.

    Training is current when the latest run finished with the same settings and data (an interrupted one
    is resumed); a merged model, or eval.json, is current when it was made from that run's adapter (eval: with
    the same eval settings and held-out data).
    """
    from qlora_app.pipeline import pipeline
    from qlora_app.recipe.loader import load_recipe
    from qlora_app.run.directory import runs_root

    resolved = load_recipe(recipe, overrides)
    pipeline(resolved, runs_root(runs_dir), host or resolved.serve.host, port or resolved.serve.port,
             allow_unauthenticated)


@main.command("demo")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: a free one).")
@runs_dir_option
def demo_cmd(port: int | None, runs_dir: str | None) -> None:
    """The tiny built-in recipe through train -> merge -> serve on CPU, asked questions with the openai client."""
    from qlora_app.demo import demo
    from qlora_app.run.directory import runs_root

    demo(runs_root(runs_dir), port)


@main.command("health")
def health_cmd() -> None:
    """Exit 0 when no server runs here or every server answers /health, else 1 (the image's HEALTHCHECK)."""
    from qlora_app.serve.process import healthy

    sys.exit(0 if healthy() else 1)


@main.command("doctor")
@click.option("--no-kernels", is_flag=True, help="Skip loading the CUDA, bitsandbytes and flash attention kernels.")
@click.option("--smoke", "smoke_test", is_flag=True,
              help="Then prove the stack in minutes: the built-in tiny model trained a few dozen steps, merged, "
                   "served by vLLM and asked one question (runs in RUNS_DIR/.smoke).")
@click.option("--recipe", "recipe_name", default=None, metavar="RECIPE",
              help="With --smoke: train with this recipe's train.attention (default: llama3-8b).")
@runs_dir_option
def doctor_cmd(no_kernels: bool, smoke_test: bool, recipe_name: str | None, runs_dir: str | None) -> None:
    """Is this machine ready: GPU, driver vs the CUDA the wheels need, free memory, whether the torch,
    bitsandbytes and flash attention kernels load (fetching the last into the HF cache), whether runs can be
    written. Exit 0 when ready, 1 when not, with what to do.

    --smoke goes on to train, merge, serve and ask the built-in tiny model, one line per step with its time;
    a failed step is one line naming it and its fix (exit 2, or 1 when the stack itself broke).
    """
    import os

    from qlora_app.run.directory import runs_root

    if recipe_name and not smoke_test:
        raise UserError("--recipe goes with --smoke: qlora-app doctor --smoke --recipe RECIPE")
    if smoke_test:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as train does
        from qlora_app.smoke import DEFAULT_RECIPE, smoke

        smoke(runs_root(runs_dir), recipe_name or DEFAULT_RECIPE, kernels=not no_kernels)
        return
    from qlora_app.machine.doctor import doctor

    sys.exit(0 if doctor(runs_root(runs_dir), kernels=not no_kernels) else 1)


@main.command("pod")
@runs_dir_option
def pod_cmd(runs_dir: str | None) -> None:
    """Keep this container alive as a pod cloud's machine: the doctor report, what to type, then wait."""
    from qlora_app.machine.pod import pod
    from qlora_app.run.directory import runs_root

    pod(runs_root(runs_dir))


@main.command("push")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--recipe", "recipe_name", default=None, help="Push the latest run of this recipe.")
@click.option("--repo", "repo_id", required=True, metavar="USER/NAME", help="The Hub repository to push to.")
@click.option("--merged/--adapter", default=False, help="Push the merged model, or the adapter (default).")
@click.option("--public", is_flag=True, help="Create the repository public (default: private).")
@runs_dir_option
def push_cmd(run_dir: str | None, recipe_name: str | None, repo_id: str, merged: bool, public: bool,
             runs_dir: str | None) -> None:
    """Upload a run's adapter (or merged model) to the Hugging Face Hub with a model card made from the run
    (default: the latest run of any recipe, or of --recipe).

    The token comes from HF_TOKEN or `hf auth login`; an interrupted push resumes when run again.
    """
    from qlora_app.push import push
    from qlora_app.run.directory import find_run, runs_root

    push(find_run(run_dir, recipe_name, runs_root(runs_dir)), "merged" if merged else "adapter", repo_id, public)


@main.command("chat")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The server's address.")
@click.option("--model", default=None, help="Model id (default: the only model the server lists).")
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help="Sampling temperature (default: the model's generation config); 0 answers deterministically.")
def chat_cmd(url: str, model: str | None, temperature: float | None) -> None:
    """Chat with a running server in this terminal; the API key comes from QLORA_API_KEY."""
    import os

    from qlora_app.chat import chat
    from qlora_app.serve.auth import KEY_ENV

    chat(url, model, os.environ.get(KEY_ENV), temperature)
