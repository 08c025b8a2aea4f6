"""A driver process imports only what its device needs, and starts fast."""

import subprocess
import sys
import time


def test_driver_process_imports_no_heavy_ml_or_vision_stack():
    code = ("import sys, drivers.core.process, drivers.mock.arm; "
            "print(','.join(m for m in ('torch', 'cv2', 'lerobot', 'onnxruntime', 'transformers') if m in sys.modules))")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    elapsed = time.monotonic() - started
    assert out.stdout.strip() == "", f"the driver imported {out.stdout.strip()}"
    # Generous for a loaded CI box; a desktop takes about 0.5 s including the interpreter.
    assert elapsed < 5.0


# --------------------------------------------------------------------------- layering (issue 10)

import ast  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import tokenize  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("runtime", "drivers", "calibration")


def _module_name(path: Path) -> str:
    return "armada." + ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
# These import torch (seconds each): the same check, in the slow set.
HEAVY = tuple(m for m in MODULES if m.startswith("armada.runtime.model."))


def _imports(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, enclosing function, module) of every import of the file, lazy ones included;
    imports under ``if TYPE_CHECKING:`` are left out (they never run)."""
    out: list[tuple[int, str | None, str]] = []

    def visit(node: ast.AST, fn: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(child, ast.Import):
                out.extend((child.lineno, fn, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.lineno, fn, child.module))
                out.extend((child.lineno, fn, f"{child.module}.{a.name}") for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), None)
    return out


def test_no_import_cycles_among_our_modules_lazy_imports_included():
    """A lazy import that closes a circle still breaks when the other side is imported first
    (runtime.config <-> calibration.results <-> runtime.transport did, issue 10)."""
    graph = {m: {i for _, _, i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert cycles == [], f"import cycles: {cycles}"


def _import_alone(module: str) -> tuple[str, int, str]:
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    return module, out.returncode, out.stderr.strip()[-600:]


def _check_alone(modules: list[str]) -> None:
    with ThreadPoolExecutor(4) as pool:
        failed = [r for r in pool.map(_import_alone, modules) if r[1] != 0]
    assert failed == [], "\n".join(f"import {m} alone failed: {err}" for m, _, err in failed)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    _check_alone([m for m in MODULES if m not in HEAVY])


@pytest.mark.slow
def test_every_model_module_imports_alone_in_a_fresh_interpreter():
    _check_alone(list(HEAVY))


# Device names (and the mock kind): none in the driver core, the config loader, the CLI or the
# generic calibration modules. Comments and docstrings may cite the device that motivated a design
# (drivers/core/isolated.py says which SDK blocks how); code, identifiers and messages may not.
DEVICE_NAME = re.compile(r"(?<![a-z0-9])(ur3|ur[-_ ]?rtde|rtde|piper|cobot|so-?101|feetech|sts3215|aloha|dynamixel|"
                         r"arx|lerobot|mock)(?![a-z0-9])")
GENERIC = [*sorted((REPO / "drivers" / "core").glob("*.py")), REPO / "runtime" / "config.py", REPO / "runtime" / "cli.py",
           *sorted((REPO / "calibration").glob("*.py"))]
# The e-stop bench measures the core's stop path over a mock arm that stamps its estop calls: a
# benchmark tool that lives beside the core, not the core (moving it is left to a later change).
NAME_EXEMPT = {REPO / "drivers" / "core" / "stop_bench.py"}


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def device_names(path: Path) -> list[str]:
    """``file:line: name in token`` for every device name in the file's code and strings."""
    src = path.read_text(encoding="utf-8")
    docs = _docstring_lines(ast.parse(src))
    kinds = {tokenize.NAME, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in kinds or (tok.type == tokenize.STRING and tok.start[0] in docs):
            continue
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", tok.string).lower()  # PiperZero -> piper_zero
        m = DEVICE_NAME.search(words)
        if m:
            hits.append(f"{where}:{tok.start[0]}: {m.group(0)!r} in {tok.string[:60]!r}")
    return hits


def test_the_generic_modules_name_no_device():
    hits = [h for p in GENERIC if p not in NAME_EXEMPT for h in device_names(p)]
    assert hits == [], "device names in generic modules:\n" + "\n".join(hits)


def test_the_device_name_check_can_fail(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text('"""Docstrings may cite a PiPer."""\nfrom drivers.piper.plugin import PLUGIN  # a comment: ur3\n'
                   'KIND = "so101"\nclass AlohaThing: pass\nmsg = f"on a {KIND} Dynamixel bus"\n')
    hits = device_names(bad)
    assert [h.split(": ")[0].rsplit(":", 1)[1] for h in hits] == ["2", "3", "4", "5"], hits


def test_production_code_never_imports_a_fake():
    """Fakes are test and bench equipment. Only benches (which run the real SDK against the fake) and
    a plugin's ``fake`` entry (`armada fake KIND`) may import them."""
    hits = []
    for module, path in MODULES.items():
        if "fake" in path.relative_to(REPO).parts or path.name == "bench.py":
            continue
        for line, fn, imported in _imports(path):
            if "fake" in imported.split(".") and not (path.name == "plugin.py" and fn == "fake"):
                hits.append(f"{path.relative_to(REPO)}:{line}: imports {imported}")
    assert hits == [], "\n".join(sorted(set(hits)))


def test_installed_the_folders_import_only_under_the_armada_namespace(tmp_path):
    """Installing armada must not put packages named runtime, drivers or calibration at the top of
    site-packages, where they would shadow anything else of that name (issue 10)."""
    code = ("import importlib.util as u, armada.runtime.cli, armada.drivers.core.driver, armada.calibration.results; "
            "print([n for n in ('runtime', 'drivers', 'calibration') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_no_file_imports_the_old_top_level_names():
    """Inside the repository the folders also import as top-level names (they are on sys.path);
    code that relied on that would break once installed."""
    files = [*MODULES.values(), *sorted((REPO / "tests").rglob("*.py"))]
    hits = [f"{p.relative_to(REPO)}:{line}: {imported}" for p in files for line, _, imported in _imports(p)
            if imported.split(".")[0] in PACKAGES]
    assert hits == [], "\n".join(hits)


def test_a_cell_with_a_remote_policy_imports_no_ray_and_no_model_stack():
    # The cell side of a fleet talks HTTP + msgpack to the service (issue 16); Ray stays in the service.
    code = ("import sys, armada.runtime.inference.process, armada.runtime.fleet.plugin, armada.runtime.fleet.wire; "
            "print(','.join(m for m in ('ray', 'torch', 'onnxruntime', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"the cell side of the fleet imported {out.stdout.strip()}"
