//! `log graph`: the trail as a property graph that a real graph database (Kùzu) and
//! NetworkX load, and that answers the reviewer's questions in Cypher.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use custody_audit::review::{
    graph::{export, CsvDir, GraphMl},
    reader::{DirSource, TrailSource},
};
use custody_config::{Action, Policy, Severity};
use custody_tests::*;
use serde_json::Value;

async fn ask(custody: &Custody, user: &str, text: &str) -> u16 {
    let body = serde_json::json!({
        "model": "gpt-4o",
        "user": user,
        "messages": [{"role": "user", "content": text}],
    });
    let url = custody.url("/v1/chat/completions");
    send(&client(), post(&url, &[], body.to_string()))
        .await
        .0
        .status
        .as_u16()
}

#[tokio::test]
async fn the_graph_loads_into_kuzu_and_networkx_and_answers_the_reviewers_questions() {
    let answer = Answer::model("gpt-4o-2024-05-13");
    let up = answering_upstream(answer.clone()).await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.policies = vec![Policy::new(
            "no-exfiltration",
            "request.text.contains('exfiltrate')",
            Action::Block,
            Severity::High,
        )];
    })
    .await;
    assert_eq!(ask(&custody, "alice", "hello").await, 200);
    answer.lock().unwrap().model = "gpt-4o-2024-08-06".into();
    assert_eq!(ask(&custody, "bob", "hello").await, 200);
    assert_eq!(
        ask(&custody, "mallory", "please exfiltrate the keys").await,
        403
    );
    // Another configuration: carol is served the same new version under it.
    let mut next = custody.config.clone();
    next.limits.max_request_body_bytes += 1;
    custody.reload(next).await.unwrap();
    assert_eq!(ask(&custody, "carol", "hello").await, 200);
    // A client naming itself with a newline, quotes and a comma loads all the same.
    assert_eq!(ask(&custody, "eve\n\"x\", y", "hello").await, 200);
    let stopped = custody.stop().await;

    let records = &stopped.records;
    assert_eq!(records.len(), 5);
    let config_of = |user: &str| -> String {
        let r = records
            .iter()
            .find(|r| r["client"]["user"] == user)
            .unwrap();
        r["config"]["version"].as_str().unwrap().to_owned()
    };
    let first = config_of("bob");
    assert_eq!(config_of("alice"), first);
    assert_ne!(config_of("carol"), first, "the reload made a new version");
    let blocked: &Value = records
        .iter()
        .find(|r| r["client"]["user"] == "mallory")
        .unwrap();
    let blocked_prompt = blocked["prompt"]["hash"].as_str().unwrap();

    let dir = stopped.audit_dir();
    let source = DirSource(dir.as_path());
    let sources: Vec<&dyn TrailSource> = vec![&source];
    let out = tempfile::tempdir().unwrap();
    let csv = out.path().join("csv");
    let summary = export(
        &sources,
        (i64::MIN, i64::MAX),
        Box::new(CsvDir::create(&csv).unwrap()),
    )
    .unwrap();
    assert_eq!(summary.exchanges, 5);
    assert_eq!(summary.unreadable, 0);
    let graphml = out.path().join("trail.graphml");
    let file = std::io::BufWriter::new(std::fs::File::create(&graphml).unwrap());
    export(
        &sources,
        (i64::MIN, i64::MAX),
        Box::new(GraphMl::new(file).unwrap()),
    )
    .unwrap();
    // A second export into the same directory is refused, not mixed in.
    assert!(CsvDir::create(&csv).is_err());

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("graph/load.py");
    let run = std::process::Command::new(tools_python())
        .arg(script)
        .args([&csv, &graphml])
        .args(["gpt-4o-2024-08-06", first.as_str()])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let answer: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        answer["users"],
        serde_json::json!(["bob"]),
        "only bob got the new version under the first config"
    );
    assert_eq!(
        answer["blocked_prompts"],
        serde_json::json!([[blocked_prompt, "no-exfiltration"]])
    );
    assert_eq!(answer["counts"]["Exchange"], 5);
    assert_eq!(answer["counts"]["User"], 5);
    assert_eq!(answer["counts"]["Model"], 2);
    assert_eq!(answer["counts"]["Config"], 2);
    assert_eq!(answer["counts"]["Policy"], 1);
    assert_eq!(answer["networkx"]["users"], serde_json::json!(["bob"]));
    assert_eq!(
        answer["networkx"]["nodes"].as_u64().unwrap(),
        summary.nodes,
        "GraphML holds every node"
    );
    assert_eq!(answer["networkx"]["edges"].as_u64().unwrap(), summary.edges);
}
