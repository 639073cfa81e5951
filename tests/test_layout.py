"""The shape of the code (../shared/DESIGN.md): floors, what imports what, file sizes, packaging."""
import ast
import pathlib
import subprocess
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
# The import name of each top folder: `kernels/` installs as `llmx_kernels` (pyproject.toml).
IMPORT_NAMES = {"llmx": "llmx", "kernels": "llmx_kernels", "experiments": "experiments",
                "tests": "tests", "benchmarks": "benchmarks"}


def _modules():
  """{module name: path} of every Python file under the top folders."""
  out = {}
  for top, name in IMPORT_NAMES.items():
    for path in (REPO / top).rglob("*.py"):
      parts = list(path.relative_to(REPO / top).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join([name, *parts])] = path
  return out


def _imports(module: str, path: pathlib.Path) -> set[str]:
  """Absolute names of the modules `path` imports (relative imports resolved), top level or not."""
  is_package = path.name == "__init__.py"
  package = module if is_package else module.rpartition(".")[0]
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base_pkg = package.split(".")
        base_pkg = base_pkg[:len(base_pkg) - (node.level - 1)]
        base = ".".join(base_pkg + ([node.module] if node.module else []))
      names.add(base)
      names.update(f"{base}.{a.name}" for a in node.names)
  return names


MODULES = _modules()
IMPORTS = {m: {i for i in _imports(m, p) if i in MODULES} for m, p in MODULES.items()}


def _floor(module: str) -> str:
  parts = module.split(".")
  if parts[0] == "llmx" and len(parts) > 1 and parts[1] in ("families", "nn", "data", "train",
                                                              "inference", "formats"):
    return ".".join(parts[:2])
  return parts[0]


def test_nothing_below_experiments_imports_it():
  bad = [(m, i) for m, deps in IMPORTS.items() if not m.startswith("experiments")
         for i in deps if i.startswith("experiments")]
  assert not bad, bad


def test_floors_import_only_floors_below():
  """kernels: jax only; formats and data: nothing above; nn: kernels; train and inference: kernels
  and nn (and the floor-2 packages named); families: floors 1-2; one family never imports another."""
  allowed = {
      "llmx_kernels": {"llmx_kernels"},
      "llmx.formats": {"llmx.formats", "llmx"},
      "llmx.data": {"llmx.data", "llmx.formats", "llmx_kernels", "llmx"},
      "llmx.nn": {"llmx.nn", "llmx_kernels", "llmx"},
      "llmx.train": {"llmx.train", "llmx.nn", "llmx_kernels", "llmx"},
      "llmx.inference": {"llmx.inference", "llmx.nn", "llmx_kernels", "llmx"},
  }
  bad = []
  for module, deps in IMPORTS.items():
    floor = _floor(module)
    for dep in deps:
      dep_floor = _floor(dep)
      if floor in allowed and dep_floor not in allowed[floor]:
        bad.append(f"{module} imports {dep}")
      if floor == "llmx.families" and dep_floor == "llmx.families":
        if module.split(".")[2:3] != dep.split(".")[2:3] and dep != "llmx.families":
          bad.append(f"{module} imports another family: {dep}")
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph = {m: {d for d in deps if d != m and not m.startswith(d + ".")} for m, deps in IMPORTS.items()}
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for dep in graph.get(node, ()):
      if state.get(dep) == "open":
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, cycles


def test_file_sizes():
  """Entry points parse flags and call the library (<= 80 lines); other files <= 500 lines."""
  long = []
  for module, path in MODULES.items():
    if module.startswith("tests") or "configs" in module:
      continue
    limit = 80 if module.startswith("experiments") else 500
    n = len(path.read_text().splitlines())
    if n > limit:
      long.append(f"{path.relative_to(REPO)}: {n} lines > {limit}")
  assert not long, long


def test_pyproject_names_every_package():
  listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
  packages = {m for m, p in MODULES.items() if p.name == "__init__.py"
              and m.split(".")[0] in ("llmx", "llmx_kernels")}
  assert listed == packages, (sorted(packages - listed), sorted(listed - packages))


def test_importing_the_library_has_no_side_effects():
  """No absl flags registered, no malloc settings changed, nothing written, on import."""
  library = sorted(m for m in MODULES if m.split(".")[0] in ("llmx", "llmx_kernels")
                   and ".bench" not in m and "cubin_check" not in m)
  # The libraries llmx builds on (flax registers absl logging flags of its own) come first.
  code = ("import sys, importlib; from absl import flags\n"
          "import jax, flax.nnx, optax, orbax.checkpoint, grain, tokenizers\n"
          "before = set(flags.FLAGS)\n"
          f"for m in {library!r}: importlib.import_module(m)\n"
          "new = set(flags.FLAGS) - before\n"
          "assert not new, sorted(new)\n"
          "print('ok', len(sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
