"""`recur push MODEL --repo-id ORG/NAME`: a model on the Hugging Face Hub, loadable without recur.

MODEL is a run dir or a checkpoint (exported first, as `recur export` does) or an exported /
transformers model folder (its model files copied; nothing is written into it). What goes up is
one commit of a staging folder: safetensors, config.json (with `auto_map`), the model's code,
the tokenizer, the generation config, recur_checkpoint.json, and a model card (README.md) with
the architecture, the recipe, the tokens seen and the last `recur eval` results as `model-index`.
The repo then loads with `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`.

huggingface_hub does the talking: the endpoint is HF_ENDPOINT, the token HF_TOKEN or the stored
login (`hf auth login`). `--dry-run` shows the files and the card and sends nothing. The token
never appears in what this prints: a Hub error is one line naming the repo and the HTTP status.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from ..config import UserError, first_line


class HubError(UserError):
    pass


# The files of a model folder that go up (top level only, as transformers saves them). A whitelist, so
# that whatever else a user keeps beside a model (notes, samples, eval/, optimizer states) stays home.
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "*.py",
               "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
               "chat_template.*", "recur_checkpoint.json")
RECORD = "recur_checkpoint.json"  # what recur export recorded: step, tokens, seq_len, ...


@dataclass
class Staged:
    folder: Path                                   # what is uploaded
    kind: str                                      # checkpoint | folder
    results_dir: Path                              # where `recur eval` wrote
    training: dict = field(default_factory=dict)   # step, tokens, seq_len, ... (empty when not from recur)
    recipe: Path | None = None                     # run_dir/recipe.yaml when the run dir is known
    left_out: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- staging

def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--repo-id {repo_id!r}: give ORG/NAME (a user or organization, a slash, the repo name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--repo-id {repo_id!r}: {str(e).splitlines()[0]}") from None
    return repo_id


def stage(model: str, out: Path) -> Staged:
    """The files to upload in `out` (a new folder), from a checkpoint or a model folder."""
    from .load import _checkpoint

    path = Path(model).expanduser()
    if not path.exists():
        raise HubError(f"{path}: no such file or folder (MODEL is a run dir, a checkpoint or a model folder)")
    if (found := _checkpoint(path)) is not None:
        from recur.train.checkpoint import export, read_state

        root, tag, run_dir = found
        export(root / tag, out)  # verifies the checkpoint; writes weights, code, tokenizer, generation config
        staged = Staged(out, "checkpoint", run_dir / "eval", read_state(root, tag), run_dir / "recipe.yaml")
    elif path.is_dir() and (path / "config.json").is_file():
        staged = _stage_folder(path, out)
    else:
        raise HubError(f"{path}: neither a recur checkpoint (no manifest.json or checkpoints/latest) nor a model "
                       "folder (no config.json)")
    if staged.recipe is not None and not staged.recipe.is_file():
        staged.recipe = None
    record = out / RECORD
    if record.is_file():  # the local checkpoint path means nothing on the Hub (and names the user's disk)
        kept = {k: v for k, v in json.loads(record.read_text()).items() if k != "checkpoint"}
        record.write_text(json.dumps(kept, indent=1))
    return staged


def _stage_folder(path: Path, out: Path) -> Staged:
    try:
        config = json.loads((path / "config.json").read_text())
        training = json.loads((path / RECORD).read_text()) if (path / RECORD).is_file() else {}
    except (OSError, ValueError) as e:
        raise HubError(f"{path}: cannot read its config.json or {RECORD} ({first_line(e)})") from None
    checkpoint = training.get("checkpoint")  # run_dir/checkpoints/step_N, when recur exported it
    recipe = Path(checkpoint).parent.parent / "recipe.yaml" if checkpoint else None
    files = [p for p in sorted(path.iterdir()) if p.is_file() and any(fnmatch.fnmatch(p.name, m) for m in MODEL_FILES)]
    left_out = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if p not in files)
    out.mkdir(parents=True)
    if _needs_saving(path, config):
        # An export of an older recur (no code beside it) or weights not in safetensors: transformers loads
        # it and saves it again; recur's save_pretrained writes the code and auto_map.
        from .load import _folder

        model, tokenizer = _folder(path)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        files = [p for p in files if p.name in ("generation_config.json", RECORD)]
    for p in files:
        shutil.copy2(p, out / p.name)
    return Staged(out, "folder", path / "eval", training, recipe, left_out)


def _needs_saving(path: Path, config: dict) -> bool:
    import recur  # noqa: F401  registers the families
    from recur.modeling import FAMILIES

    if not any(path.glob("*.safetensors")):
        return True
    if config.get("model_type") not in FAMILIES:
        return False  # transformers' own architectures need no code
    modules = [ref.split("--")[-1].rpartition(".")[0] for ref in (config.get("auto_map") or {}).values()
               if isinstance(ref, str)]
    return not modules or not all((path / f"{m}.py").is_file() for m in modules)


# ----------------------------------------------------------------------------------------- the card

def parameter_count(folder: Path) -> int:
    """Parameters stored in the safetensors files (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def _config(folder: Path):
    """The config as an object when transformers knows the type (it maps e.g. n_layer to num_hidden_layers)."""
    from transformers import AutoConfig, PretrainedConfig

    import recur  # noqa: F401

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return PretrainedConfig.from_dict(json.loads((folder / "config.json").read_text()))


def eval_results(results: dict | None) -> list:
    """lm-eval's results as model-index entries: one per task and numeric metric, stderr left out."""
    from huggingface_hub import EvalResult

    entries = []
    for task, metrics in sorted((results or {}).get("results", {}).items()):
        shots = (results.get("n-shot") or {}).get(task)
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if (metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):  # lm-eval writes "N/A" stderrs, NaN for a failed metric
                continue
            name = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            entries.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=metric, metric_value=value, metric_name=name,
                                      dataset_args={"num_few_shot": shots} if shots is not None else None))
    return entries


def model_card(staged: Staged, repo_id: str, revision: str):
    from huggingface_hub import ModelCard, ModelCardData

    from recur.modeling import FAMILIES

    from .harness import latest_results, markdown_table

    config = _config(staged.folder)
    model_type = getattr(config, "model_type", None) or "unknown"
    results = latest_results(staged.results_dir) if staged.results_dir.is_dir() else None
    entries = eval_results(results)
    name = repo_id.split("/")[1]
    tags = ["recur", model_type] + (["recurrent"] if model_type in FAMILIES else [])
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags, model_name=name,
                         eval_results=entries or None)

    rows = [("model_type", f"`{model_type}`"), ("layers", getattr(config, "num_hidden_layers", None)),
            ("width (hidden size)", getattr(config, "hidden_size", None)),
            ("vocabulary", getattr(config, "vocab_size", None)), ("parameters", _count(parameter_count(staged.folder)))]
    body = [f"# {name}", "", f"A `{model_type}` causal language model" + (", trained with recur." if staged.training
                                                                           else ", pushed with recur."), "",
            "## Architecture", "", "| | |", "|---|---|"]
    body += [f"| {key} | {value} |" for key, value in rows if value is not None]
    training = staged.training
    if training:
        facts = [f"{training[k]:,} {label}" for k, label in (("tokens", "tokens seen"), ("step", "optimizer steps"))
                 if isinstance(training.get(k), int)]
        facts += [f"sequence length {training['seq_len']}"] if training.get("seq_len") else []
        facts += [f"{training['world_size']} process(es)"] if training.get("world_size") else []
        body += ["", "## Training", "", "; ".join(facts) + "."] if facts else []
    if staged.recipe is not None:
        body += ["", "The recipe it was trained with (`recur train`):", "", "```yaml",
                 staged.recipe.read_text().rstrip(), "```"]
    if entries:
        run = results.get("recur") or {}
        limit = run.get("limit")  # lm-eval's --limit: a fraction below 1, else documents per task
        note = "" if not limit else f" on {limit:.0%} of each task" if limit < 1 else f" on {limit:g} documents a task"
        body += ["", "## Evaluation", "", f"The last `recur eval` (lm-eval){note}:", "",
                 markdown_table(results).rstrip()]
    remote = bool(getattr(config, "auto_map", None))  # the model's code is in the repo
    at = f', revision="{revision}"' if revision != "main" else ""
    body += ["", "## How to load", ""]
    body += ["The model's code travels in the repo (`auto_map` in config.json): recur need not be installed.",
             ""] if remote else []
    body += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{at}'
             + (", trust_remote_code=True)" if remote else ")"),
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{at})', "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _count(n: int) -> str | None:
    return f"{n:,} ({n / 1e6:.2f}M)" if n else None


# ----------------------------------------------------------------------------------------- upload

def _scrubbed(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def upload(folder: Path, repo_id: str, *, private: bool, revision: str, message: str, token: str | None):
    """(repo URL, commit URL); every failure a one-line HubError without the token."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = constants.ENDPOINT  # read now: HF_ENDPOINT as this process got it (tests point it at a fake Hub)
    try:
        from httpx2 import TransportError
    except ImportError:  # huggingface_hub < 2 talks httpx
        from httpx import TransportError
    api = HfApi(endpoint=endpoint, token=token)
    where = f"push to {repo_id} at {endpoint}"
    try:
        repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the org's default
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message)
    except HfHubHTTPError as e:
        raise HubError(_scrubbed(_http_message(where, e, repo_id, revision), token)) from None
    except OfflineModeIsEnabled:
        raise HubError(f"{where}: HF_HUB_OFFLINE is set; unset it (or set it to 0) to push") from None
    except (TransportError, OSError) as e:
        raise HubError(_scrubbed(f"{where}: cannot reach the Hub ({type(e).__name__}: {first_line(e)})", token)) \
            from None
    except ValueError as e:  # the Hub refused README.md's metadata (validate-yaml), a bad revision name, ...
        raise HubError(_scrubbed(f"{where}: {first_line(e)}", token)) from None
    return str(repo_url), commit.commit_url


def _http_message(where: str, error, repo_id: str, revision: str) -> str:
    status = error.response.status_code if error.response is not None else None
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    hint = {401: "the token is missing, invalid or expired (`hf auth login`, or set HF_TOKEN to a write token)",
            403: f"the token may not write to {repo_id.split('/')[0]} (a write token with access to it is needed)",
            404: f"{repo_id} (revision {revision}) is not there, or the token cannot see it"}.get(
        status, "the Hub failed; try again later" if status and status >= 500 else "")
    said = first_line(error.server_message) if error.server_message else ""
    return (f"{where} failed: HTTP {status} {phrase}" + (f": {hint}" if hint else "")
            + (f" (the Hub said: {said[:200]})" if said else ""))



def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recur push", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("model", help="a run dir, a checkpoint, an exported or transformers model folder")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created when it is not there)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                                "visibility)")
    parser.add_argument("--revision", default="main", help="branch to push to (created from main when missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--dry-run", action="store_true", help="show the files and the card; upload nothing")
    args = parser.parse_args(argv)
    repo_id = check_repo_id(args.repo_id)
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN or the stored login; only to keep it out of everything printed
    if token is None and not args.dry_run:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token)")
    with tempfile.TemporaryDirectory(prefix="recur-push-") as tmp:
        staged = stage(args.model, Path(tmp) / "repo")
        card = _scrubbed(str(model_card(staged, repo_id, args.revision)), token)
        (staged.folder / "README.md").write_text(card)
        files = sorted(p for p in staged.folder.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        if staged.left_out:
            print(f"not uploaded from {args.model}: {', '.join(staged.left_out)}", file=sys.stderr)
        print(f"{'would push' if args.dry_run else 'pushing'} {len(files)} files ({_size(total)}) to {repo_id} "
              f"(revision {args.revision}):")
        for p in files:
            print(f"  {str(p.relative_to(staged.folder)):<48} {_size(p.stat().st_size):>10}")
        if args.dry_run:
            print(f"\n--- README.md ---\n{card}")
            return 0
        model_type = json.loads((staged.folder / "config.json").read_text()).get("model_type", "model")
        message = args.commit_message or f"Upload {model_type} with recur push"
        repo_url, commit_url = upload(staged.folder, repo_id, private=args.private, revision=args.revision,
                                      message=message, token=token)
    print(f"pushed to {repo_url}" + (f" (branch {args.revision})" if args.revision != "main" else ""))
    print(f"commit: {commit_url}")
    return 0
