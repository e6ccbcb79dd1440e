"""The command line: options built from Config dataclasses, validation, help text, lazy imports, the demo."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

from sparsemoe import cli, gates
from sparsemoe.cli import main
from sparsemoe.experiments import EXPERIMENTS, demo
from sparsemoe.experiments.config import ConfigError, validate
from sparsemoe.experiments.reporting import demo as demo_report

SRC = Path(__file__).resolve().parents[1] / "src"
RST = re.compile(r"``|:[a-z]+:`")


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width


# ---------------------------------------------------------------------------------------------- commands


def test_gates_command_lists_every_gate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gates"]) == 0
    out = capsys.readouterr().out
    for name in gates.available():
        assert name in out
    assert not RST.search(out)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--seeds", "0"], "--seeds"),
        (["--seeds", "-2"], "--seeds"),
        (["--epochs", "0"], "--epochs"),
        (["--threads", "0"], "--threads"),
        (["--gates", "nope"], "--gates"),
        (["--gates", "topk", "topk"], "--gates"),
    ],
)
def test_bad_demo_values_exit_2_naming_the_option(
    argv: list[str], option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "train_one", _must_not_train)
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsemoe: error: argument " + option + ":"), err
    assert not (tmp_path / "results.json").exists()


SEEDED = (
    "comet-movielens",
    "comet-multimnist",
    "gate-saturation",
    "moebert-sst2",
    "router-lm",
    "thor-multi30k",
    "upcycle-smollm2",
)


@pytest.mark.parametrize("command", [["demo"], *(["reproduce", name] for name in SEEDED)])
def test_every_command_names_the_flag_not_the_config_field(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # comet-tuning reads the comet-movielens studies; thor-convergence's --seeds lists seed ids
    assert {*SEEDED, "comet-tuning", "thor-convergence"} == set(EXPERIMENTS)
    assert main([*command, "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsemoe: error: argument --seeds: must be") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["demo"], ["reproduce", "thor-multi30k"], ["reproduce", "comet-movielens"]])
def test_an_out_inside_a_file_is_a_one_line_error(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("keep me")
    assert main([*command, "--quick", "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"sparsemoe: error: argument --out: {tmp_path / 'file'} is a file, not a folder; pass another --out\n"
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("comet-movielens", "movielens-100k"),
        ("comet-multimnist", "mnist-5k"),
        ("comet-tuning", "movielens-100k"),
        ("thor-multi30k", "multi30k"),
        ("thor-convergence", "multi30k"),
        ("router-lm", "multi30k"),
    ],
)
def test_nothing_is_written_before_the_data_check_passes(
    name: str, data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPARSEMOE_DATA_DIR", str(tmp_path / "no-data"))
    out = tmp_path / "out"
    assert main(["reproduce", name, "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sparsemoe data fetch {data}" in err, err
    assert not out.exists()  # no Optuna database, no run store, no tokenizer cache


def test_data_fetch_offers_every_data_set_a_study_reads(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["data", "fetch"], capsys)
    for name in ("movielens-100k", "mnist-5k", "multi30k", "sst2"):
        assert name in text
    args = cli.build_parser().parse_args(["data", "fetch", "sst2", "--root", "somewhere"])
    assert (args.name, args.root) == ("sst2", "somewhere")


def test_demo_writes_to_an_untracked_folder_unless_told_otherwise() -> None:
    assert demo.Config().out == Path("sparsemoe-out/demo")
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "sparsemoe-out/" in ignored
    assert demo.Config(out=Path("results/demo")).out == Path("results/demo")  # the committed results, on request


def test_unknown_gate_message_lists_the_gates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--gates", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown gate 'nope'" in err and "topk" in err


def test_unparsable_value_is_an_argparse_error_naming_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seeds", "three"])
    assert exit_info.value.code == 2
    assert "argument --seeds: invalid int value: 'three'" in capsys.readouterr().err


def test_help_is_plain_text_and_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    top = _help([], capsys)
    assert "demo" in top and "reproduce" in top
    demo_help = _help(["demo"], capsys)
    for name in ("--quick", "--out", "--seeds", "--gates", "--epochs", "--fresh", "--threads"):
        assert name in demo_help
    assert "default: 3" in demo_help and "at least 1" in demo_help
    listing = _help(["reproduce"], capsys)
    pages = [top, demo_help, listing]
    for name in EXPERIMENTS:
        assert name in listing
        pages.append(_help(["reproduce", name], capsys))
    for page in pages:
        assert not RST.search(page), RST.search(page)


def test_plain_removes_rst_markup() -> None:
    assert cli.plain("a ``b`` :class:`~torch.nn.Linear` :func:`c` `d`") == "a b torch.nn.Linear c d"


# ------------------------------------------------------------------------------ Config -> options, generic


@dataclass
class Toy:
    """A Config with every supported field type."""

    flag: bool = field(default=False, metadata={"help": "a flag"})
    on: bool = field(default=True, metadata={"help": "on unless --no-on"})
    names: list[str] = field(default_factory=lambda: ["a", "b"], metadata={"help": "some names"})
    out: Path = field(default=Path("x"), metadata={"help": "a folder"})
    count: int = field(default=2, metadata={"help": "a count", "min": 1, "max": 5})
    steps: int | None = field(default=None, metadata={"help": "steps", "min": 1})
    rate: float = field(default=0.1, metadata={"help": "a rate", "above": 0.0})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "a mode"})
    sizes: list[int] = field(default_factory=lambda: [1], metadata={"help": "sizes", "min": 1})

    def __post_init__(self) -> None:
        validate(self)


def _toy(argv: list[str]) -> Toy:
    parser = argparse.ArgumentParser()
    cli.add_config_options(parser, Toy)
    return cli.config_from_args(Toy, parser.parse_args(argv))


def test_options_from_config_fields_keep_defaults_and_types() -> None:
    assert _toy([]) == Toy()
    toy = _toy(
        [
            "--flag",
            "--no-on",
            "--names",
            "p",
            "q",
            "--out",
            "y/z",
            "--count",
            "5",
            "--steps",
            "7",
            "--rate",
            "2.5",
            "--mode",
            "slow",
            "--sizes",
            "3",
            "4",
        ]
    )
    assert toy == Toy(True, False, ["p", "q"], Path("y/z"), 5, 7, 2.5, "slow", [3, 4])
    assert isinstance(toy.out, Path) and isinstance(toy.rate, float)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--count", "0"], "--count"),
        (["--count", "6"], "--count"),
        (["--steps", "0"], "--steps"),
        (["--rate", "0"], "--rate"),
        (["--sizes", "2", "0"], "--sizes"),
    ],
)
def test_out_of_range_values_name_their_option(argv: list[str], option: str) -> None:
    with pytest.raises(ValueError, match=f"^argument {option}: must be"):
        _toy(argv)


def test_choices_come_from_literal(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _toy(["--mode", "medium"])
    assert "invalid choice: 'medium'" in capsys.readouterr().err


def test_config_checks_python_callers_too() -> None:
    with pytest.raises(ConfigError, match="count: must be at least 1 and at most 5"):
        Toy(count=0)
    with pytest.raises(TypeError, match="count must be int, got str"):
        Toy(count="2")  # type: ignore[arg-type]  # reason: the wrong type is what is tested
    with pytest.raises(TypeError, match="count must be int, got bool"):
        Toy(count=True)
    with pytest.raises(TypeError, match="rate must be float, got None"):
        Toy(rate=None)  # type: ignore[arg-type]  # reason: the wrong type is what is tested
    assert Toy(out="a/b").out == Path("a/b")  # type: ignore[arg-type]  # reason: str is accepted for a Path
    assert Toy(rate=1).rate == 1.0 and isinstance(Toy(rate=1).rate, float)


def test_a_field_without_help_is_rejected() -> None:
    @dataclass
    class NoHelp:
        n: int = 1

        def __post_init__(self) -> None:
            validate(self)

    with pytest.raises(TypeError, match="'n' has no metadata"):
        NoHelp()


def test_a_field_the_command_line_uses_is_rejected() -> None:
    @dataclass
    class Clash:
        threads: int = field(default=1, metadata={"help": "threads"})

    with pytest.raises(TypeError, match=r"Clash\.threads: the command line uses this name"):
        cli.add_config_options(argparse.ArgumentParser(), Clash)


def _fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(EXPERIMENTS, name.replace("_", "-"), name)


def test_reproduce_runs_a_config_module_with_the_chosen_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = '''
        """A fake experiment with a Config."""
        from dataclasses import dataclass, field
        import torch
        from sparsemoe.experiments.config import validate
        SEEN = []

        @dataclass
        class Config:
            seeds: int = field(default=3, metadata={"help": "seeds", "min": 1})

            def __post_init__(self):
                validate(self)

        def run(config):
            SEEN.append((config, torch.get_num_threads()))
            return {}
    '''
    _fake_module(tmp_path, monkeypatch, "fake_config_exp", source)
    threads = torch.get_num_threads()
    try:
        assert main(["reproduce", "fake-config-exp", "--seeds", "4", "--threads", "2"]) == 0
        import fake_config_exp  # type: ignore[import-not-found]  # reason: written by this test

        (config, seen_threads), *_ = fake_config_exp.SEEN
        assert config.seeds == 4 and seen_threads == 2
        assert main(["reproduce", "fake-config-exp", "--seeds", "0"]) == 2
        assert "argument --seeds: must be at least 1 (got 0)" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("fake_config_exp", None)


# ----------------------------------------------------------------------------------- imports and layering


_PROBE = """
import json, sys
stages = {}
import sparsemoe
stages["import sparsemoe"] = sorted(sys.modules)
import sparsemoe.experiments, sparsemoe.experiments.config
stages["import sparsemoe.experiments"] = sorted(sys.modules)
from sparsemoe.cli import main
for argv in (["--help"], ["demo", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
    stages[" ".join(argv)] = sorted(sys.modules)
print(json.dumps(stages))
"""

HEAVY = ("optuna", "matplotlib", "sklearn")


@pytest.fixture(scope="module")
def loaded_modules() -> dict[str, set[str]]:
    """The modules a fresh interpreter has loaded after each step of: import, --help, demo --help."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    return {stage: set(names) for stage, names in json.loads(done.stdout.splitlines()[-1]).items()}


def test_importing_the_package_and_experiments_loads_no_optional_heavy_module(
    loaded_modules: dict[str, set[str]],
) -> None:
    loaded = loaded_modules["import sparsemoe.experiments"]
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not [m for m in loaded if m.startswith("sparsemoe.experiments.") and m != "sparsemoe.experiments.config"]


def test_help_loads_nothing_beyond_the_package_itself(loaded_modules: dict[str, set[str]]) -> None:
    """``sparsemoe --help`` imports no experiment and nothing heavy that ``import sparsemoe`` does not."""
    base = loaded_modules["import sparsemoe"]
    allowed = {"sparsemoe.experiments.config"}
    for stage in ("--help", "demo --help"):
        extra = loaded_modules[stage] - base
        assert not [m for m in extra if m.split(".")[0] in (*HEAVY, "scipy")], stage
        if stage == "demo --help":  # its options come from its Config; training code is not heavy
            allowed |= {"sparsemoe.experiments.demo", "sparsemoe.experiments.progress"}
            allowed |= {"sparsemoe.experiments.reporting", "sparsemoe.experiments.reporting.common"}
            allowed |= {"sparsemoe.experiments.reporting.demo", "sparsemoe.experiments.store"}
        experiments = {m for m in extra if m.startswith("sparsemoe.experiments.")}
        assert experiments <= allowed, experiments - allowed


def test_library_core_does_not_import_experiments() -> None:
    """Only the experiments themselves and the command line may import ``sparsemoe.experiments``."""
    package = SRC / "sparsemoe"
    offenders = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.parts[0] == "experiments" or rel.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
                names += [f"{names[0]}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(re.search(r"(^|\.)experiments($|\.)", name) for name in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders


def test_tools_are_not_in_the_installed_package() -> None:
    assert not (SRC / "sparsemoe" / "experiments" / "readme.py").exists()
    assert not (SRC / "sparsemoe" / "experiments" / "comet_readme.py").exists()
    assert (SRC / "sparsemoe" / "py.typed").exists()


# ----------------------------------------------------------------------------------------------- the demo


def _must_not_train(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
    raise AssertionError("a run was trained that should not have been")


def test_demo_quick_writes_results_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--quick", "--out", str(tmp_path), "--gates", "topk", "comet"]
    old_umask = os.umask(0o022)
    try:
        assert main(args) == 0
    finally:
        os.umask(old_umask)
    out_dir = tmp_path / "quick"
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["summary"]) == {"topk", "comet"}
    assert results["config"]["quick"] is True and results["config"]["epochs"] == demo.QUICK["epochs"]
    assert results["torch_threads"] == 1  # the command's --threads default
    for gate, summary in results["summary"].items():
        assert 0.5 < summary["mean_auc"]["mean"] <= 1.0, gate
    assert (out_dir / "demo.png").stat().st_size > 1000
    table = (out_dir / "table.md").read_text()
    assert table.startswith("# sparsemoe demo (quick run)")
    assert "| comet |" in table and "| topk |" in table
    # Files keep normal permissions (0666 minus the umask), not mkstemp's 0600.
    for path in [out_dir / "results.json", out_dir / "table.md", *(out_dir / "runs").glob("*.json")]:
        assert path.stat().st_mode & 0o777 == 0o644, path

    # A second call finds both runs saved, says so, and trains nothing.
    capsys.readouterr()
    monkeypatch.setattr(demo, "train_one", _must_not_train)
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "reusing 2 saved runs" in err and "--fresh to retrain" in err
    assert json.loads((out_dir / "results.json").read_text())["summary"] == results["summary"]


def test_demo_run_takes_a_config_and_fresh_retrains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = demo.Config(quick=True, out=tmp_path, gates=["hash"])
    results = demo.run(config)
    for name in ("results.json", "table.md", "demo.png"):
        assert (tmp_path / "quick" / name).is_file()
    assert results == json.loads((tmp_path / "quick" / "results.json").read_text())
    assert [r["gate"] for r in results["runs"]] == ["hash"]
    assert not (tmp_path / "results.json").exists()  # a quick run never overwrites the full results

    trained = []

    def fake_train(gate: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
        trained.append((gate, seed, settings["epochs"]))
        return {**results["runs"][0], "seed": seed}

    monkeypatch.setattr(demo, "train_one", fake_train)
    demo.run(demo.Config(quick=True, out=tmp_path, gates=["hash"], fresh=True, epochs=2))
    assert trained == [("hash", 0, 2)]


def test_demo_config_defaults_and_quick_settings() -> None:
    full = demo.Config()
    assert full.gates == gates.trainable() and full.seed_count == 3 and full.epoch_count == demo.DEFAULTS["epochs"]
    quick = demo.Config(quick=True, seeds=5)
    assert quick.seed_count == 1 and quick.epoch_count == demo.QUICK["epochs"]
    assert demo.Config(quick=True, epochs=9).epoch_count == 9
    assert demo.Config(gates=["comet+", "topk"]).gates == ["comet+", "topk"]  # "+": with local search
    with pytest.raises(ConfigError, match=r"unknown gate 'nope\+'"):
        demo.Config(gates=["nope+"])


def _fake_summary(seeds: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    records = [
        {"gate": g, "seed": s, "auc": [0.95, 0.96], "mean_auc": 0.955 + 0.01 * s, "active_experts": 2.0, "seconds": 1.0}
        for g in ("topk", "hash")
        for s in range(seeds)
    ]
    return demo.summarise(records, ["topk", "hash"]), records


@pytest.mark.parametrize("quick", [True, False])
def test_demo_figure_is_honest(quick: bool) -> None:
    seeds = 1 if quick else 3
    summary, records = _fake_summary(seeds)
    settings = {**demo.DEFAULTS, "seeds": seeds, "quick": quick, "gate_kwargs": demo.GATE_KWARGS}
    fig = demo_report.figure(summary, records, settings)
    title = fig.get_suptitle()
    assert ("quick" in title) == quick
    quality, sparsity = fig.axes
    low, high = quality.get_ylim()
    # The range is the data's (every seed inside, little else), so gates a few thousandths apart differ visibly.
    seeds_auc = [r["mean_auc"] for r in records]
    assert low < min(seeds_auc) and high > max(seeds_auc)
    assert high - low < 1.5 * (max(seeds_auc) - min(seeds_auc)) + 0.02
    assert "the gate's k" in [t.get_text() for t in sparsity.get_legend().get_texts()]
    assert sparsity.get_ylim()[0] == 0 and sparsity.get_ylim()[1] >= demo.DEFAULTS["num_experts"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in (quality, sparsity):
        legend = ax.get_legend()
        assert legend is not None
        labels = " ".join(t.get_text() for t in legend.get_texts())
        assert "std" in labels or "one seed" in labels or "experts" in labels
        # the legend sits wholly below the plotting area: it cannot cover data
        assert legend.get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0
    spread = " ".join(t.get_text() for t in quality.get_legend().get_texts())
    assert (f"±1 std over {seeds} seeds" in spread) == (not quick)


def test_demo_figure_zooms_on_the_leaders_when_a_gate_trails_far_behind() -> None:
    records = [
        {"gate": g, "seed": s, "auc": [a, a], "mean_auc": a + 0.001 * s, "active_experts": 2.0, "seconds": 1.0}
        for g, a in (("topk", 0.995), ("comet", 0.993), ("hash", 0.95))
        for s in range(3)
    ]
    summary = demo.summarise(records, ["topk", "comet", "hash"])
    settings = {**demo.DEFAULTS, "seeds": 3, "quick": False, "gate_kwargs": demo.GATE_KWARGS}
    fig = demo_report.figure(summary, records, settings)
    everything, zoom, _ = fig.axes
    assert [t.get_text() for t in zoom.get_xticklabels()] == ["topk", "comet"]
    assert zoom.get_ylim()[0] > 0.99 > everything.get_ylim()[0]  # hash is left out of the zoom only


def test_ctrl_c_in_an_experiment_is_one_line_naming_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(config: demo.Config) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    argv = ["demo", "--quick", "--out", str(tmp_path / "my out")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.strip().endswith(f"Continue with: sparsemoe demo --quick --out '{tmp_path / 'my out'}'")
