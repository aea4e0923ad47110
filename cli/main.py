"""The `cxr` command: wires the sub-commands together and maps errors to messages and exit codes.

Exit codes: 0 success, 1 runtime error (a CXRError, or any other exception: one line on stderr, newlines folded;
CXR_TRACEBACK=1 re-raises unexpected ones), 2 usage error, 130 interrupted.
Each command module imports the heavy library code inside its function, so `cxr --help` stays fast.
"""

from __future__ import annotations

import os
import sys

# Sleep, don't spin, in OpenMP waits (torch, faiss): on a busy 2-core machine spinning threads starved each other
# (cxr-tiny batch-1 encode 1.2 -> 48 images/s, benchmarks/results/profiles/torch_threads_cpu.txt). Must be set
# before torch or faiss load OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

from cli import (
    data_demo,
    data_import,
    data_manifest,
    demo_cmd,
    eval_generation,
    eval_retrieval,
    generate_cmd,
    index_cmd,
    index_sync,
    models_cmd,
    query,
    serve,
    train_cmd,
    vlm_detector,
    vlm_train,
)

# Plain click help, not typer's rich panels: formatting help with rich imports rich.markdown and markdown-it, which
# doubled `cxr --help` (0.9 -> 0.45 s on a loaded 2-core machine; benchmarks/results/cli_latency.md).
PLAIN_HELP = {"rich_markup_mode": None}
app = typer.Typer(
    name="cxr",
    help="Cross-modal chest X-ray retrieval and retrieval-augmented report generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    **PLAIN_HELP,
)
data_app = typer.Typer(
    help="Import datasets into study manifests; build the demo corpus.", no_args_is_help=True, **PLAIN_HELP
)
eval_app = typer.Typer(help="Measure retrieval and generation quality.", no_args_is_help=True, **PLAIN_HELP)
index_app = typer.Typer(help="Build, extend and inspect FAISS indexes.", no_args_is_help=True, **PLAIN_HELP)
vlm_app = typer.Typer(help="Train the multi-task vision-language model.", no_args_is_help=True, **PLAIN_HELP)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(index_app, name="index")
app.add_typer(vlm_app, name="vlm")
app.add_typer(models_cmd.app, name="models")

data_app.command("import")(data_import.import_cmd)
data_app.command("validate")(data_import.validate_cmd)
data_app.command("demo")(data_demo.demo_data_cmd)
data_app.command("merge")(data_manifest.merge_cmd)
data_app.command("split")(data_manifest.split_cmd)
app.command("train")(train_cmd.train_cmd)
eval_app.command("retrieval")(eval_retrieval.eval_retrieval_cmd)
eval_app.command("generation")(eval_generation.eval_generation_cmd)
index_app.command("build")(index_cmd.build_cmd)
index_app.command("add")(index_cmd.add_cmd)
index_app.command("info")(index_cmd.info_cmd)
index_app.command("verify")(index_cmd.verify_cmd)
index_app.command("gc")(index_cmd.gc_cmd)
index_app.command("sync")(index_sync.sync_cmd)
index_app.command("repair")(index_cmd.repair_cmd)
app.command("query")(query.query_cmd)
vlm_app.command("train")(vlm_train.vlm_train_cmd)
vlm_app.command("detector")(vlm_detector.vlm_detector_cmd)
app.command("generate")(generate_cmd.generate_cmd)
app.command("demo")(demo_cmd.demo_cmd)
app.command("serve")(serve.serve_cmd)


def one_line(error: BaseException, limit: int = 600) -> str:
    """An error message on one line: libraries (torch's refused pickles, pyarrow) raise multi-line ones."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns or exits with the exit code."""
    from retrieval.errors import CXRError, UsageError

    try:
        # standalone mode: click/typer print usage errors themselves and raise SystemExit(2).
        app(args=argv, prog_name="cxr", standalone_mode=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UsageError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = 2
    except CXRError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        code = 130
    except Exception as e:  # a bug or an unexpected library error: still one line, never a traceback
        if os.environ.get("CXR_TRACEBACK"):
            raise
        where = getattr(e, "filename", None)
        print(
            f"error: {where + ': ' if where else ''}{type(e).__name__}: {one_line(e)} "
            "(unexpected; set CXR_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        code = 1
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
