"""Writes every PromQL expression of the Grafana dashboard as a recording rule, with
Grafana's variables given values, so that `promtool check rules` parses them all.

python3 deploy/monitoring/check-dashboard.py deploy/monitoring/custody-dashboard.json > rules.yaml
"""
import json
import sys

VARIABLES = {"$__rate_interval": "5m", "$route": ".*", "${datasource}": ""}


def exprs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs(item)


def main(path):
    dashboard = json.load(open(path))
    found = list(exprs(dashboard))
    if not found:
        sys.exit(f"{path}: no expressions")
    print("groups:\n  - name: dashboard\n    rules:")
    for i, expr in enumerate(found):
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        print(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(expr)}")


if __name__ == "__main__":
    main(sys.argv[1])
