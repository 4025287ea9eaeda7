"""Job specs as TOML: reading (tomllib) and writing the subset a spec uses
(tables, strings, numbers, booleans, arrays)."""
import json
import math
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError


def loads(text):
    return tomllib.loads(text)


def nest(spec):
    """A copy of `spec` with dotted keys ("optimizer.lr": 0.1) made tables,
    as `ringtrain submit --set optimizer.lr=0.1` does."""
    out = {}
    for key, value in spec.items():
        if not isinstance(key, str):
            raise TypeError(f"spec keys are strings, not {key!r}")
        if isinstance(value, dict):
            value = nest(value)
        *tables, last = key.split(".")
        node = out
        for t in tables:
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise ValueError(f"spec key {key!r}: {t!r} is not a table")
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    return out


def _key(k):
    if k and all(c.isalnum() or c in "_-" for c in k) and k.isascii():
        return k
    return _string(k)


def _string(s):
    # JSON's escapes are TOML's (DEL is the one TOML wants escaped too).
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007F")


def _value(v, where):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, where) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x, where)}" for k, x in v.items()) + "}"
    if hasattr(v, "__fspath__"):
        return _string(str(v.__fspath__()))
    raise TypeError(f"spec key {where!r}: cannot write {type(v).__name__} {v!r} as TOML")


def dumps(spec):
    """TOML text of a (nested) dict: plain keys first, then each table."""
    lines = []

    def table(d, path):
        plain = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
        tables = [(k, v) for k, v in d.items() if isinstance(v, dict)]
        if path and (plain or not tables):
            lines.append("[" + ".".join(_key(p) for p in path) + "]")
        for k, v in plain:
            if v is None:
                continue
            lines.append(f"{_key(k)} = {_value(v, '.'.join(path + [k]))}")
        for k, v in tables:
            table(v, path + [k])

    table(spec, [])
    return "\n".join(lines) + "\n"
