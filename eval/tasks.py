"""lm-eval's standard tasks from local files: the stock task, re-pointed at files on disk.

For each of `lambada_openai`, `wikitext`, `piqa` and `hellaswag`, a task YAML is generated that
`include`s lm-eval's own YAML (so its prompt, preprocessing and metrics are used unchanged) and
overrides only the dataset keys (`dataset_path: json`, `dataset_name: null`, `data_files`, the
splits, `tag: []`). It keeps the stock task's name; lm-eval lets an include path take precedence
over its own tasks. The local files are the original releases, laid out as in `../shared/data`:

    DATA_DIR/eval/lambada/lambada_test.jsonl          LAMBADA (OpenAI's version), one {"text": ...} per line
    DATA_DIR/eval/wikitext-2-raw/wiki.test.raw         WikiText-2 raw v1, test split
    DATA_DIR/eval/piqa/valid.jsonl, valid-labels.lst   PIQA validation (goal, sol1, sol2) and its labels
    DATA_DIR/eval/hellaswag/hellaswag_val_full.txt     HellaSwag validation, 6 lines per item:
                                                        "activity_label: context", gold index, 4 endings

They are converted once into the jsonl each stock task reads (the schema of its Hub dataset), into
a folder beside the YAMLs. WikiText is split into documents at its top-level headings (` = Title
= `), as EleutherAI/wikitext_document_level does (62 test documents).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import UserError

STOCK = ("lambada_openai", "wikitext", "piqa", "hellaswag")
FILES = {
    "lambada_openai": ["eval/lambada/lambada_test.jsonl"],
    "wikitext": ["eval/wikitext-2-raw/wiki.test.raw"],
    "piqa": ["eval/piqa/valid.jsonl", "eval/piqa/valid-labels.lst"],
    "hellaswag": ["eval/hellaswag/hellaswag_val_full.txt"],
}
# stock YAML (relative to lm_eval/tasks) and the split the local file provides
STOCK_YAML = {"lambada_openai": ("lambada/lambada_openai.yaml", "test"), "wikitext": ("wikitext/wikitext.yaml", "test"),
              "piqa": ("piqa/piqa.yaml", "validation"), "hellaswag": ("hellaswag/hellaswag.yaml", "validation")}


class TaskError(UserError):
    pass


def default_data_dir() -> Path | None:
    """../shared/data beside the project (this machine's copy of the releases), when it exists."""
    from recur import RECIPES_DIR

    candidate = RECIPES_DIR.parent.parent / "shared" / "data"
    return candidate if (candidate / "eval").is_dir() else None


def stock_yaml(task: str) -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / STOCK_YAML[task][0]


def missing_files(task: str, data_dir: Path) -> list[Path]:
    return [data_dir / f for f in FILES[task] if not (data_dir / f).is_file()]


# ----------------------------------------------------------------------------------------- conversions

def _lambada(data_dir: Path) -> list[dict]:
    rows = []
    for number, line in enumerate((data_dir / FILES["lambada_openai"][0]).read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record.get("text"), str):
                raise TaskError(f"{data_dir / FILES['lambada_openai'][0]}:{number}: no string field 'text'")
            rows.append({"text": record["text"]})
    return rows


def wikitext_pages(raw: str) -> list[str]:
    """Documents of a WikiText raw file: a new one at each top-level heading line (` = Title = `,
    not ` = = Section = = `), the heading included; as EleutherAI/wikitext_document_level."""
    pages, page = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\n".join(page).strip():
                pages.append("\n".join(page))
            page = []
        page.append(line)
    if "\n".join(page).strip():
        pages.append("\n".join(page))
    return pages


def _wikitext(data_dir: Path) -> list[dict]:
    return [{"page": page} for page in wikitext_pages((data_dir / FILES["wikitext"][0]).read_text())]


def _piqa(data_dir: Path) -> list[dict]:
    questions = [json.loads(line) for line in (data_dir / FILES["piqa"][0]).read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (data_dir / FILES["piqa"][1]).read_text().split()]
    if len(labels) != len(questions):
        raise TaskError(f"{data_dir / FILES['piqa'][1]} has {len(labels)} labels for {len(questions)} questions "
                        f"in {data_dir / FILES['piqa'][0]}")
    return [{"goal": q["goal"], "sol1": q["sol1"], "sol2": q["sol2"], "label": label}
            for q, label in zip(questions, labels)]


def _hellaswag(data_dir: Path) -> list[dict]:
    """Back to the Hub dataset's fields. The file's first line is already `activity_label: ctx` as the
    stock task builds it (ctx_a + " " + ctx_b.capitalize(), cleaned), so it goes in whole as ctx_a with
    an empty ctx_b; the stock preprocessing strips the space that leaves and changes nothing else."""
    path = data_dir / FILES["hellaswag"][0]
    lines = path.read_text().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise TaskError(f"{path}: {len(lines)} lines is not 6 per item (context, gold index, 4 endings)")
    rows = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        label, sep, context = head.partition(": ")
        if not sep or not gold.isdigit() or not 0 <= int(gold) < 4:
            raise TaskError(f"{path}:{i + 1}: expected 'activity_label: context' then a gold index 0-3")
        rows.append({"activity_label": label, "ctx_a": context, "ctx_b": "", "endings": endings, "label": gold})
    return rows


CONVERT = {"lambada_openai": _lambada, "wikitext": _wikitext, "piqa": _piqa, "hellaswag": _hellaswag}


def write_local_tasks(tasks: list[str], data_dir: Path, out: Path) -> list[str]:
    """Task YAMLs (and their jsonl files) under `out` for the stock tasks in `tasks`; returns those written."""
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in STOCK:
            continue
        missing = missing_files(task, data_dir)
        if missing:
            raise TaskError(f"--data-dir {data_dir}: {task} needs {missing[0]}, which is not there "
                            f"(expected layout: {', '.join(FILES[task])})")
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in CONVERT[task](data_dir)))
        split = STOCK_YAML[task][1]
        splits = {key: (split if key == f"{split}_split" else None)
                  for key in ("training_split", "validation_split", "test_split")}
        config = {"include": str(stock_yaml(task)), "task": task, "tag": [], "dataset_path": "json",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data)}}, **splits}
        (out / f"{task}.yaml").write_text(_yaml(config))
        written.append(task)
    return written


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
