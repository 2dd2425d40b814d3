"""Grid files of `rim sweep`: methods x seeds x values of any recipe key, in one YAML file.

    recipes: ../demo              # <recipes>/<method>.yaml, relative to this file, or a
                                  # path with {method}: ../mult/small_4x4_{method}.yaml
    methods: [direct, pause, rim, cot]
    seeds: 3                      # train.seed = 0 .. seeds - 1
    set:                          # overrides of every run; `{seed}` in a value is the run's
      train.eval_every: 100       # seed (model.path: .../seed{seed}/best: the same seed's run)
    grid:                         # axes; the runs are their cartesian product
      pairs:                      # an axis: its name, then recipe keys that move together
        data.train.options.pairs: [4, 8, 12, 16]   # the first key's values label the axis
        memory.blocks: [5, 9, 13, 17]              # value i goes with value i of every key
      train.lr: [5.0e-4, 1.0e-3]  # a one-key axis, named after the key's last part: lr
    select: lr                    # optional: an axis chosen on validation (rim.sweep)
    reuse: [../../results/width]  # optional: other sweeps' --out folders, relative to this file

`reuse` names the output folders of other sweeps: a run whose resolved recipe and seed
finished there is taken from there (its folder, not a copy) instead of being trained again,
so two grids that share a point (width's N = 16 column and grounding's LR 1e-3) share its
runs.

`grid` may also be a list of such mappings, each its own product, the runs their union (as
scikit-learn's ParameterGrid takes a list); each may name its own `methods`, `recipes` (one
grid holds 4x4 and 5x5 recipes) and `seeds`. A part with fewer `seeds` than the grid is a
search of the `select` axis, which must be one of its axes: its cells run seeds 0 .. its
seeds - 1, then `rim sweep` runs the grid's other seeds of the value chosen on validation
only (rim.sweep), in the same command (grounding's LR, chosen on seed 0). Keys that move
together are listed value by value, not derived by a formula: the file shows every value a
run gets, and a test can check the rule (K = N + 1, equal budgets). A run's recipe is the
method's file, then `set`, then `rim sweep --set`, then the cell's axis values, so the grid
always wins. Errors name the file and the key (`ConfigError`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from rim.config import _read_yaml
from rim.errors import ConfigError

TOP_KEYS = ("recipes", "methods", "seeds", "set", "grid", "select", "reuse")


@dataclass(frozen=True)
class Axis:
    """One dimension of a product: recipe keys whose i-th values go into the same runs."""

    name: str
    keys: dict  # recipe key -> its values, all of one length

    @property
    def key(self) -> str:
        """The key whose values label the axis (tables, folders, plots)."""
        return next(iter(self.keys))

    @property
    def values(self) -> list:
        return self.keys[self.key]


@dataclass(frozen=True)
class Part:
    """One cartesian product: its methods times its axes."""

    methods: tuple[str, ...]
    axes: tuple[Axis, ...]
    recipes: Path  # a folder of <method>.yaml, or a path with {method}
    seeds: int  # below the grid's: a search of `select` on these seeds (the module doc)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a method, its axis values, and the overrides they make."""

    method: str
    values: dict  # axis name -> value, for this part's axes
    overrides: dict  # recipe key -> value
    recipe: Path
    seeds: int  # its part's


@dataclass(frozen=True)
class Grid:
    """A parsed grid file; `cells()` expands it."""

    path: Path
    recipes: Path
    seeds: int
    set: dict
    parts: tuple[Part, ...]
    select: str | None
    reuse: tuple[Path, ...] = ()  # other sweeps' --out folders whose finished runs count

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(m for p in self.parts for m in p.methods))

    @property
    def axes(self) -> list[Axis]:
        """Every axis once (by name), in the order the file first names it."""
        seen: dict[str, Axis] = {}
        for part in self.parts:
            for axis in part.axes:
                seen.setdefault(axis.name, axis)
        return list(seen.values())

    def recipe(self, method: str) -> Path:
        return recipe_path(self.recipes, method)

    def cells(self) -> list[Cell]:
        """Every (method, axis values) of every part, in file order (methods outermost)."""
        out = []
        for part in self.parts:
            for method in part.methods:
                for index in itertools.product(*(range(len(a.values)) for a in part.axes)):
                    values = {a.name: a.values[i] for a, i in zip(part.axes, index)}
                    over = {k: v[i] for a, i in zip(part.axes, index) for k, v in a.keys.items()}
                    recipe = recipe_path(part.recipes, method)
                    out.append(Cell(method, values, over, recipe, part.seeds))
        return out


def recipe_path(recipes: Path, method: str) -> Path:
    """A method's recipe: `recipes` with {method} filled in, or <recipes>/<method>.yaml."""
    text = str(recipes)
    if "{method}" in text:
        return Path(text.replace("{method}", method))
    return recipes / f"{method}.yaml"


# --------------------------------------------------------------------------- parsing


def _methods(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise ConfigError(f"{where}: expected a non-empty list of method names, got {value!r}")
    if len(set(value)) < len(value):
        raise ConfigError(f"{where}: a method is named twice")
    return tuple(value)


def _axis(name, spec, where: str) -> Axis:
    """`name: [values]` (one key) or `name: {key: [values], ...}` (keys moving together)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: an axis needs a name, got {name!r}")
    one = isinstance(spec, list)
    keys = {name: spec} if one else spec
    if not isinstance(keys, dict) or not keys:
        raise ConfigError(f"{where}: expected a list of values or a mapping of keys to lists")
    at = (lambda key: where) if one else (lambda key: f"{where}.{key}")
    first = next(iter(keys))
    for key, values in keys.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{at(key)}: expected a non-empty list of values")
        if len(values) != len(keys[first]):
            raise ConfigError(
                f"{at(key)}: {len(values)} values, expected {len(keys[first])} "
                f"(one for each value of {first})"
            )
    if len({repr(v) for v in keys[first]}) < len(keys[first]):
        raise ConfigError(f"{at(first)}: a value is named twice (it labels the axis)")
    return Axis(name.rsplit(".", 1)[-1] if one else name, dict(keys))


def _part(spec, top: Part, here: Path, where: str) -> Part:
    """One product; `top` holds the grid's methods, recipes and seeds (a part may set its own;
    `here`: the grid file's folder)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping of axes")
    spec = dict(spec)
    methods, recipes, seeds = top.methods, top.recipes, top.seeds
    if "methods" in spec:
        methods = _methods(spec.pop("methods"), f"{where}.methods")
    if "recipes" in spec:
        recipes = _recipes(spec.pop("recipes"), here, f"{where}.recipes")
    if "seeds" in spec:
        seeds = _seeds(spec.pop("seeds"), f"{where}.seeds")
        if seeds > top.seeds:
            raise ConfigError(f"{where}.seeds: more than the grid's seeds ({top.seeds})")
    axes = [_axis(name, values, f"{where}.{name}") for name, values in spec.items()]
    names = [a.name for a in axes]
    keys = [k for a in axes for k in a.keys]
    if len(set(names)) < len(names) or len(set(keys)) < len(keys):
        raise ConfigError(f"{where}: an axis name or recipe key appears twice")
    return Part(methods, tuple(axes), recipes, seeds)


def _parts(raw: dict, top: Part, here: Path) -> tuple[Part, ...]:
    grid = raw.get("grid", {})
    if isinstance(grid, dict):
        parts = (_part(grid, top, here, "grid"),)
    elif isinstance(grid, list) and grid:
        parts = tuple(_part(p, top, here, f"grid[{i}]") for i, p in enumerate(grid))
    else:
        raise ConfigError("grid: expected a mapping of axes or a non-empty list of them")
    if any(not p.methods for p in parts):
        raise ConfigError("methods: give the methods (top level or in every part of grid)")
    first: dict[str, str] = {}
    for i, part in enumerate(parts):
        for axis in part.axes:
            if first.setdefault(axis.name, axis.key) != axis.key:
                raise ConfigError(
                    f"grid[{i}].{axis.name}: labelled by {axis.key}, elsewhere by "
                    f"{first[axis.name]} (one axis name, one key)"
                )
    return parts


def _recipes(value, here: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a folder or a path with {{method}}, got {value!r}")
    return here / value


def _seeds(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected an integer >= 1, got {value!r}")
    return value


def _grid(path: Path, raw: dict, need_reuse: bool) -> Grid:
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown grid key (known: {', '.join(TOP_KEYS)})")
    recipes = _recipes(raw.get("recipes", "../demo"), path.parent, "recipes")
    methods = _methods(raw["methods"], "methods") if "methods" in raw else ()
    seeds = _seeds(raw.get("seeds", 1), "seeds")
    sets = raw.get("set") or {}
    if not isinstance(sets, dict) or not all(isinstance(k, str) for k in sets):
        raise ConfigError("set: expected a mapping of recipe keys to values")
    parts = _parts(raw, Part(methods, (), recipes, seeds), path.parent)
    select = raw.get("select")
    if select is not None and select not in {a.name for p in parts for a in p.axes}:
        raise ConfigError(f"select: {select!r} is not an axis of grid")
    for i, part in enumerate(parts):
        if part.seeds < seeds and select not in {a.name for a in part.axes}:
            where = f"grid[{i}]" if isinstance(raw.get("grid"), list) else "grid"
            raise ConfigError(
                f"{where}.seeds: fewer than the grid's seeds makes a search, whose `select` "
                "axis this part must have"
            )
    reuse = _reuse(raw.get("reuse", []), path.parent, need_reuse)
    grid = Grid(path, recipes, seeds, dict(sets), parts, select, reuse)
    for cell in grid.cells():
        if not cell.recipe.is_file():
            raise ConfigError(f"methods: {cell.method}: no recipe {cell.recipe}")
    return grid


def _reuse(value, here: Path, need: bool = True) -> tuple[Path, ...]:
    """`reuse: [FOLDER, ...]`: sweep output folders (relative to the grid file); with `need`,
    they must exist (`--dry-run` lists a plan before the sweep it reuses has run)."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"reuse: expected a list of sweep --out folders, got {value!r}")
    folders = tuple(Path(os.path.normpath(here / v)) for v in value)  # a/b/../../c -> c
    for v, folder in zip(value, folders):
        if need and not (folder / "runs").is_dir():
            raise ConfigError(f"reuse: {v}: no sweep output there (no folder {folder / 'runs'})")
    return folders


def load_grid(path: str | Path, need_reuse: bool = True) -> Grid:
    """Read and check a grid file; every error is one line naming the file and the key.
    `need_reuse=False` accepts `reuse` folders that do not exist yet (a plan only)."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return _grid(path, raw, need_reuse)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def set_axes(cell: dict, axes: dict[str, str]) -> set[str]:
    """The axes (`axes`: name -> recipe key) a results cell's own grid part sets, per its
    `sets`: in a grid where only rim varies `memory.loops`, direct's cell shows that axis's
    recipe default, which says nothing about direct.

    >>> set_axes({"sets": ["a.digits=4"]}, {"digits": "a.digits", "loops": "memory.loops"})
    {'digits'}
    """
    own = {s.split("=", 1)[0] for s in cell.get("sets", [])}
    return {a for a, key in axes.items() if key in own}
