"""docs/report.md against the real documents: every key of report.json, the --dry-run plans and `twa inspect --json`
is documented there, and every documented key is in a real document (a key added without docs, or a documented
key gone, fails here). The documents are built on tiny inputs through the CLI, once per session."""

from __future__ import annotations

import inspect
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import model_flags
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twa_tool import SCHEMA_VERSION, pipeline
from twa_tool.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "report.md"

#: Each document's key tables in docs/report.md, by their ``## `` headings (the words before a colon).
SECTIONS = {
    "average": ("Average report", "Average config"),
    "average-plan": ("Average dry-run plan", "Average config"),
    "soup": ("Soup report", "Soup config"),
    "soup-plan": ("Soup dry-run plan", "Soup config"),
    "inspect": ("Inspect listing",),
}

#: Keys that are names, not fixed words: per document, the path of the object holding them -> the placeholder the
#: docs use for them. ``KEEP``: the fixed keys among them (the soup's ``metrics.ingredients``).
NAMED = {
    "average": {"model.args": "<arg>", "metrics": "<method>", "checkpoint_metrics": "<checkpoint>"},
    "average-plan": {"model.args": "<arg>"},
    "soup": {"model.args": "<arg>", "metrics": "<method>", "metrics.ingredients": "<ingredient>",
             "twa.by_tensor": "<tensor>"},
    "soup-plan": {"model.args": "<arg>"},
    "inspect": {"checkpoints[].metrics": "<metric>", "not_selected[].metrics": "<metric>"},
}
KEEP = {"metrics.ingredients"}

#: Documented keys that no document built here can hold, and why; each must still be written by the code.
NOT_BUILT_HERE = {
    "average": {  # under torchrun only (tests/test_distributed.py runs it)
        "distributed", "distributed.world_size", "distributed.backend", "distributed.basis_bytes_per_rank",
        "distributed.columns_per_rank", "distributed.dim",
    },
}


def walk(document: object, names: dict[str, str], prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every key path of a JSON document with its value: ``a.b`` for nested objects, ``a[].b`` for the objects of a
    list; the keys of an object listed in ``names`` (by its path) collapse into that placeholder."""
    if isinstance(document, dict):
        for key, value in document.items():
            path = f"{prefix}.{key}" if prefix else key
            if prefix in names and path not in KEEP:
                path = f"{prefix}.{names[prefix]}"
            yield path, value
            yield from walk(value, names, path)
    elif isinstance(document, list):
        for value in document:
            yield from walk(value, names, f"{prefix}[]")


def key_paths(document: object, names: dict[str, str]) -> set[str]:
    return {path for path, _ in walk(document, names)}


def documented_rows(doc: str, headings: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """key path -> (type, when) of the table rows under these ``## `` headings of docs/report.md."""
    sections = re.split(r"^## ", doc, flags=re.M)
    rows: dict[str, tuple[str, str]] = {}
    for heading in headings:
        body = [s for s in sections if s.split("\n", 1)[0].split(":")[0].strip() == heading]
        assert len(body) == 1, f"docs/report.md: no single '## {heading}' section"
        found = re.findall(r"^\| `([^`]+)` \|([^|]*)\|([^|]*)\|", body[0], flags=re.M)
        assert found, f"docs/report.md: '## {heading}' has no key table"
        rows |= {key: (kind.strip(), when.strip()) for key, kind, when in found}
    return rows


def documented(doc: str, headings: tuple[str, ...]) -> set[str]:
    """The key paths in the first column of those tables."""
    return set(documented_rows(doc, headings))


#: The docs' type names -> the Python types ``json.loads`` gives (bool is not an int here).
TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "object": dict}


def has_type(value: object, kind: str) -> bool:
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(has_type(v, kind[5:-1]) for v in value)
    if kind == "list":
        return isinstance(value, list)
    return isinstance(value, TYPES[kind]) and not (kind != "bool" and isinstance(value, bool))


def invoke(*args: object) -> dict:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "256", "--threads", "1"]


@pytest.fixture(scope="session")
def hf_run(demo_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoints as Hugging Face Trainer folders (``checkpoint-<step>/model.safetensors`` and a
    ``config.json``, which the output gets a copy of: ``outputs.side_files``)."""
    root = tmp_path_factory.mktemp("hf") / "run"
    for epoch in range(5):
        folder = root / f"checkpoint-{epoch}"
        folder.mkdir(parents=True)
        with safe_open(demo_ckpts / f"{epoch}.safetensors", "pt") as f:
            metadata = f.metadata()
        save_file(load_file(demo_ckpts / f"{epoch}.safetensors"), str(folder / "model.safetensors"), metadata)
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return root


@pytest.fixture(scope="session")
def documents(demo_ckpts: Path, hf_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Real documents of every kind, on inputs that fill each optional part (an excluded checkpoint, a copied
    config.json, a quality gate, per-tensor soup coefficients, stored metrics...)."""
    out = tmp_path_factory.mktemp("reference")
    average = [
        invoke("average", hf_run, *FAST, "--exclude", "checkpoint-0", "--fail-if-worse-than", "best",
               "--on-worse", "fallback", "--tolerance", "1", "--out", out / "average", "--json"),
        invoke("demo", "--train-epochs", "1", "--epochs", "1", "--threads", "1", "--out", out / "demo", "--json"),
    ]
    plans = [invoke("average", hf_run, *FAST, "--exclude", "checkpoint-0", "--basis-dtype", dtype,
                    "--out", out / f"plan-{dtype}", "--dry-run", "--json") for dtype in ("float32", "bf16", "int8")]
    missing = ["--data", "mnist", "--data-root", out / "no-data", "--download"]  # a plan of a download (not made)
    plans.append(invoke("average", hf_run, *FAST, *missing, "--out", out / "plan-download", "--dry-run", "--json"))
    base = out / "base.safetensors"
    shutil.copy(hf_run / "checkpoint-0" / "model.safetensors", base)
    soup_flags = [*model_flags(), *FAST, "--base", base, "--exclude", "checkpoint-0"]
    soup = [invoke("soup", hf_run, *soup_flags, "--granularity", "layer", "--out", out / "soup", "--json")]
    soup_plan = [invoke("soup", hf_run, *soup_flags, "--out", out / "soup-plan", "--dry-run", "--json"),
                 invoke("soup", hf_run, *soup_flags, *missing, "--out", out / "soup-plan-download", "--dry-run",
                        "--json")]
    listing = out / "listing"
    listing.mkdir()
    for epoch in range(3):  # stored metrics and epochs, a copy under another name, a file that is not weights
        torch.save({"model": load_file(demo_ckpts / f"{epoch}.safetensors"), "epoch": epoch, "acc": 0.5 + epoch / 10},
                   listing / f"epoch_{epoch}.pt")
    shutil.copy(listing / "epoch_2.pt", listing / "last.pt")
    (listing / "notes.txt").write_text("not a checkpoint\n")
    inspected = [invoke("inspect", listing, "--last", "2", "--json")]
    return {"average": average, "average-plan": plans, "soup": soup, "soup-plan": soup_plan, "inspect": inspected}


def real_values(kind: str, documents: dict[str, list[dict]]) -> Iterator[tuple[str, object]]:
    for document in documents[kind]:
        for path, value in walk(document, NAMED[kind]):
            # the entries left out have the keys of the selected ones (one Entry.as_dict)
            yield (path.replace("not_selected[].", "checkpoints[].", 1) if kind == "inspect" else path), value


def real_keys(kind: str, documents: dict[str, list[dict]]) -> set[str]:
    return {path for path, _ in real_values(kind, documents)}


@pytest.mark.parametrize("kind", list(SECTIONS))
def test_every_key_is_documented_and_every_documented_key_exists(kind: str, documents: dict[str, list[dict]]) -> None:
    keys = real_keys(kind, documents)
    docs = documented(DOC.read_text(encoding="utf-8"), SECTIONS[kind])
    absent = NOT_BUILT_HERE.get(kind, set())
    assert sorted(keys - docs) == [], f"keys of the {kind} document missing from docs/report.md"
    assert sorted(docs - keys - absent) == [], f"keys documented for the {kind} document that it does not hold"
    assert absent <= docs


@pytest.mark.parametrize("kind", list(SECTIONS))
def test_every_value_has_its_documented_type(kind: str, documents: dict[str, list[dict]]) -> None:
    """The type column: ``list[float]`` is a list of floats..., and null only where the row says when."""
    rows = documented_rows(DOC.read_text(encoding="utf-8"), SECTIONS[kind])
    wrong = [(path, value, rows[path]) for path, value in real_values(kind, documents) if path in rows and not (
        has_type(value, rows[path][0]) or (value is None and "null" in rows[path][1]))]
    assert wrong == []


def test_keys_only_torchrun_writes_are_written_by_the_code() -> None:
    source = inspect.getsource(pipeline.distributed_facts)
    for key in NOT_BUILT_HERE["average"] - {"distributed"}:
        assert f'"{key.split(".")[-1]}"' in source, key
    assert '"distributed"' in inspect.getsource(pipeline.run_average)


def test_every_document_carries_the_schema_version_the_docs_name(documents: dict[str, list[dict]]) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert f"`schema_version` is {SCHEMA_VERSION}" in text
    commands = {"average": "average", "average-plan": "average", "soup": "soup", "soup-plan": "soup",
                "inspect": "inspect"}
    for kind, docs in documents.items():
        for document in docs:
            assert (document["schema_version"], document["tool"], document["command"]) == \
                (SCHEMA_VERSION, "twa", commands[kind]), kind
            assert list(document)[:4] == ["schema_version", "tool", "version", "command"], kind


def test_accuracies_are_fractions_everywhere(documents: dict[str, list[dict]]) -> None:
    """Every accuracy of every document is a fraction in [0, 1] (the docs say so; no document has percents)."""
    def accuracies(document: object, path: str = "") -> list[tuple[str, float]]:
        if isinstance(document, dict):
            return [a for k, v in document.items() for a in accuracies(v, f"{path}.{k}")] + \
                [(f"{path}.{k}", v) for k, v in document.items() if "accuracy" in k and not isinstance(v, dict)]
        if isinstance(document, list):
            return [a for v in document for a in accuracies(v, f"{path}[]")]
        return []

    found = [a for docs in documents.values() for d in docs for a in accuracies(d)]
    assert len(found) > 20
    assert all(isinstance(v, float) and 0 <= v <= 1 for _, v in found), found


def test_the_key_paths_are_read_as_documented() -> None:
    """The extraction the comparison rests on: lists of objects as ``[]``, named keys as their placeholder."""
    document = {"a": {"x": 1}, "metrics": {"swa": {"accuracy": 0.5}}, "files": [{"path": "p"}, {"path": "q"}],
                "tags": ["t"], "empty": []}
    assert key_paths(document, {"metrics": "<method>"}) == {
        "a", "a.x", "metrics", "metrics.<method>", "metrics.<method>.accuracy", "files", "files[].path", "tags",
        "empty"}
    text = ("## One: first\n\n| key | type | when |\n|---|---|---|\n| `a.b` | int | always |\n\n## Two\n\n"
            "| `c` | str | null when none |\n")
    assert documented_rows(text, ("One", "Two")) == {"a.b": ("int", "always"), "c": ("str", "null when none")}
    assert has_type([1.5, 2.0], "list[float]") and not has_type([1, 2.0], "list[float]") and not has_type(True, "int")
    assert has_type([["k", "v"]], "list[list[str]]") and has_type({}, "object") and not has_type(None, "str")
