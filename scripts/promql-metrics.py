#!/usr/bin/env python3
"""Lists the metric names that PromQL expressions use.

    scripts/promql-metrics.py dashboard helm/comtrexx-licensing/files/dashboard.json
    scripts/promql-metrics.py rules helm/comtrexx-licensing/files/alerts.yaml
    scripts/promql-metrics.py expr 'sum by (le) (rate(x_bucket{a="b"}[5m]))'

Prints `NAME<TAB>WHERE` per use. The extractor is small but honest about PromQL's
lexical structure: string literals, label matchers `{...}`, ranges and subqueries
`[...]`, and the label lists of by/without/on/ignoring/group_left/group_right are
removed first; what is left is identifiers, and an identifier is a metric name unless
it is a function (followed by `(`), a keyword or operator (and, or, unless, bool,
offset, ...), a number (`1e3`, `Inf`, `NaN`) or a Grafana variable (`$job`).
`label_values(METRIC, LABEL)` of a dashboard variable counts its METRIC.
"""
import json
import re
import sys

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
IDENT = re.compile(r"(?<![\w.$:])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr):
    """The metric names an expression selects, in order of appearance."""
    e = STRING.sub('""', expr)
    e = re.sub(r"\{[^{}]*\}", " ", e)
    e = re.sub(r"\[[^\[\]]*\]", " ", e)
    e = GROUPING.sub(" ", e)
    names = []
    for m in IDENT.finditer(e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        if word.lower() in KEYWORDS:
            continue
        if word not in names:
            names.append(word)
    return names


def self_test():
    cases = {
        'sum by (method, le) (rate(licensing_rpc_duration_seconds_bucket{job=~"$job"}[$__rate_interval]))':
            ["licensing_rpc_duration_seconds_bucket"],
        'time() - max(a_timestamp_seconds{x="by (y)"} > 0) / 86400 + 1e3':
            ["a_timestamp_seconds"],
        'x == 1 and ignoring (outcome) max without (instance, pod) (time() - y) > z offset 5m':
            ["x", "y", "z"],
        'up{job="a"} == 0 or absent(b{c=\'d\'})': ["up", "b"],
        '(q < 7 * 86400) > 0': ["q"],
    }
    for expr, want in cases.items():
        got = metric_names(expr)
        if got != want:
            sys.exit(f"self-test: {expr!r}: got {got}, want {want}")


def dashboard(path):
    d = json.load(open(path, encoding="utf-8"))
    uses = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    uses.extend((n, f"panel {p.get('title')!r}") for n in metric_names(t["expr"]))
            walk(p.get("panels", []))

    walk(d.get("panels", []))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", q)
        if m:
            uses.extend((n, f"variable {v.get('name')!r}") for n in metric_names(m.group(1)))
    return uses


def rules(path):
    import yaml
    doc = yaml.safe_load(open(path, encoding="utf-8"))
    uses = []
    for g in doc["groups"]:
        for r in g["rules"]:
            name = r.get("alert") or r.get("record")
            uses.extend((n, f"rule {name}") for n in metric_names(r["expr"]))
    return uses


if __name__ == "__main__":
    self_test()
    if len(sys.argv) != 3 or sys.argv[1] not in ("dashboard", "rules", "expr"):
        sys.exit(__doc__)
    kind, arg = sys.argv[1], sys.argv[2]
    uses = {"dashboard": dashboard, "rules": rules}.get(kind, lambda e: [(n, "expr") for n in metric_names(e)])(arg)
    if not uses:
        sys.exit(f"no metric names found in {arg}")
    for name, where in uses:
        print(f"{name}\t{where}")
