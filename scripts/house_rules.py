"""Print where ``lrc/`` breaks the house rules on size: modules over 300 lines, functions over
60 lines, classes (dataclasses included) with more than 8 fields or constructor parameters.

    python scripts/house_rules.py [package folder]     # exit code 1 when anything is listed
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MODULE_LINES, FUNCTION_LINES, CLASS_FIELDS = 300, 60, 8


def class_fields(node: ast.ClassDef) -> int:
    """Annotated class attributes (dataclass fields, ClassVar excluded) or ``__init__`` parameters."""
    annotated = [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                 and "ClassVar" not in ast.unparse(s.annotation)]
    init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
    params = 0
    if init is not None:
        args = init.args
        params = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) - 1  # without self
    return max(len(annotated), params)


def problems(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MODULE_LINES:
            found.append(f"{path}: module of {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno}: function {node.name} of {length} lines")
            elif isinstance(node, ast.ClassDef) and (count := class_fields(node)) > CLASS_FIELDS:
                found.append(f"{path}:{node.lineno}: class {node.name} with {count} fields or parameters")
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "lrc")
    found = problems(root)
    print("\n".join(found) if found else f"{root}: no module over {MODULE_LINES} lines, no function over "
          f"{FUNCTION_LINES} lines, no class over {CLASS_FIELDS} fields")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
