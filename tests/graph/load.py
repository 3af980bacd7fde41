"""Loads a `custody log graph` export the way a reviewer would and answers the two
questions of issue 18, printing one JSON object:

    load.py CSV_DIR GRAPHML_FILE MODEL CONFIG

- Kùzu (embedded): runs the export's own kuzu.cypher from CSV_DIR, then, in Cypher,
  "which users received outputs from model MODEL under config version CONFIG" and
  "which prompts led to blocked requests";
- NetworkX: reads the GraphML and answers the first question again by walking it.
"""

import json
import os
import sys
import tempfile

import kuzu
import networkx as nx

csv_dir, graphml, model, config = sys.argv[1:5]

db_dir = tempfile.mkdtemp()
db = kuzu.Database(os.path.join(db_dir, "trail.kuzu"))
conn = kuzu.Connection(db)
os.chdir(csv_dir)
with open("kuzu.cypher") as f:
    for statement in f.read().split(";\n"):
        if statement.strip():
            conn.execute(statement)


def rows(query, **params):
    result = conn.execute(query, params)
    out = []
    while result.has_next():
        out.append(result.get_next())
    return out


users = rows(
    "MATCH (u:User)-[:ASKED]->(e:Exchange)-[:SERVED_BY]->(m:Model {id: $model}), "
    "(e)-[:UNDER_CONFIG]->(c:Config {id: $config}) RETURN DISTINCT u.id ORDER BY u.id",
    model=model,
    config=config,
)
blocked = rows(
    "MATCH (p:Prompt)<-[:SENT]-(e:Exchange)-[d:DECIDED_BY]->(r:Policy) "
    "WHERE d.effect = 'blocked' RETURN DISTINCT p.id, r.id ORDER BY p.id"
)
counts = {
    label: rows(f"MATCH (n:{label}) RETURN count(n)")[0][0]
    for label in ["Exchange", "User", "Prompt", "Completion", "Model", "Config", "Policy"]
}
continues = rows("MATCH (:Exchange)-[r:CONTINUES]->(:Exchange) RETURN count(r)")[0][0]

g = nx.read_graphml(graphml)
nx_users = set()
for e, attrs in g.nodes(data=True):
    if attrs.get("label") != "Exchange":
        continue
    targets = {g.nodes[t]["label"]: g.nodes[t]["name"] for t in g.successors(e)}
    if targets.get("Model") == model and targets.get("Config") == config:
        nx_users.update(g.nodes[u]["name"] for u in g.predecessors(e) if g.nodes[u]["label"] == "User")

print(json.dumps({
    "users": [r[0] for r in users],
    "blocked_prompts": [[r[0], r[1]] for r in blocked],
    "counts": counts,
    "continues": continues,
    "networkx": {
        "nodes": g.number_of_nodes(),
        "edges": g.number_of_edges(),
        "users": sorted(nx_users),
    },
}))
