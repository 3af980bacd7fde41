//! The trail as a property graph, for a graph database or a notebook: who asked what,
//! under which configuration, answered by which model, decided by which rule.
//!
//! Nodes: `Exchange` (one per record), `User`, `Team`, `Key`, `Session`,
//! `Conversation`, `Prompt` and `Completion` (by their keyed hashes), `Model` (the model
//! that served), `Route`, `Config` (configuration versions) and `Policy` (rules).
//! Edges, all from the exchange but the first: `ASKED` (User to Exchange), `WITH_KEY`,
//! `FOR_TEAM`, `IN_SESSION`, `IN_CONVERSATION`, `CONTINUES` (to the exchange it follows
//! in its conversation), `SENT` (Prompt), `RECEIVED` (Completion), `SERVED_BY`
//! (Model), `VIA_ROUTE`, `UNDER_CONFIG` and `DECIDED_BY` (Policy, with the effect).
//!
//! Streams the trail once. Memory: a 16-byte digest per distinct node (to write each
//! once, and to link only exchanges the export holds), at most [`MAX_NODES`] of them;
//! edges go straight out.

use std::{
    collections::HashSet,
    fs,
    io::{self, BufWriter, Write},
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::{
    reader::{self, TrailSource},
    tally::start_ms,
};
use crate::{record::Record, AuditError};

/// Distinct nodes an export remembers (about 48 bytes each: 200 MB at most).
pub const MAX_NODES: usize = 4_000_000;

/// A value of a property.
#[derive(Debug, Clone, Copy)]
pub enum Prop<'a> {
    Str(&'a str),
    Int(i64),
    None,
}

/// Property names and types.
pub type Props = &'static [(&'static str, Type)];

/// The node labels, with their properties (after `id`).
pub const NODES: &[(&str, Props)] = &[
    (
        "Exchange",
        &[
            ("seq", Type::Int),
            ("time", Type::Str),
            ("status", Type::Int),
            ("outcome", Type::Str),
            ("requested_model", Type::Str),
            ("served_model", Type::Str),
            ("input_tokens", Type::Int),
            ("output_tokens", Type::Int),
        ],
    ),
    ("User", &[]),
    ("Team", &[]),
    ("Key", &[]),
    ("Session", &[]),
    ("Conversation", &[]),
    ("Prompt", &[]),
    ("Completion", &[]),
    ("Model", &[]),
    ("Route", &[]),
    ("Config", &[]),
    ("Policy", &[]),
];

/// The edge labels: from, to, and their properties.
pub const EDGES: &[(&str, &str, &str, Props)] = &[
    ("ASKED", "User", "Exchange", &[]),
    ("WITH_KEY", "Exchange", "Key", &[]),
    ("FOR_TEAM", "Exchange", "Team", &[]),
    ("IN_SESSION", "Exchange", "Session", &[]),
    ("IN_CONVERSATION", "Exchange", "Conversation", &[]),
    ("CONTINUES", "Exchange", "Exchange", &[]),
    ("SENT", "Exchange", "Prompt", &[]),
    ("RECEIVED", "Exchange", "Completion", &[]),
    ("SERVED_BY", "Exchange", "Model", &[]),
    ("VIA_ROUTE", "Exchange", "Route", &[]),
    ("UNDER_CONFIG", "Exchange", "Config", &[]),
    (
        "DECIDED_BY",
        "Exchange",
        "Policy",
        &[
            ("effect", Type::Str),
            ("action", Type::Str),
            ("mode", Type::Str),
        ],
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Str,
    Int,
}

/// Where the graph goes.
pub trait GraphSink {
    fn node(&mut self, label: &str, id: &str, props: &[Prop<'_>]) -> io::Result<()>;
    fn edge(&mut self, label: &str, from: &str, to: &str, props: &[Prop<'_>]) -> io::Result<()>;
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphSummary {
    pub exchanges: u64,
    pub nodes: u64,
    pub edges: u64,
    /// Record lines that did not parse as records (skipped).
    pub unreadable: u64,
}

/// Writes the records starting in `[since, until)` (Unix ms) to `sink`.
pub fn export(
    sources: &[&dyn TrailSource],
    (since, until): (i64, i64),
    mut sink: Box<dyn GraphSink>,
) -> Result<GraphSummary, AuditError> {
    let mut g = Graph {
        sink: sink.as_mut(),
        seen: HashSet::new(),
        summary: GraphSummary::default(),
        error: None,
    };
    for source in sources {
        reader::for_each_line_overlapping(*source, (since, until), |line| {
            g.line(line, since, until)
        })?;
        if let Some(e) = g.error.take() {
            return Err(e);
        }
    }
    let summary = g.summary;
    sink.finish().map_err(io_err)?;
    Ok(summary)
}

fn io_err(e: io::Error) -> AuditError {
    AuditError::Graph(e.to_string())
}

/// Text XML 1.0 can carry: other control characters become U+FFFD.
fn xml_safe(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c < ' ' && !matches!(c, '\t' | '\n' | '\r') || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    };
    if s.contains(bad) {
        s.replace(bad, "\u{FFFD}").into()
    } else {
        s.into()
    }
}

struct Graph<'s> {
    sink: &'s mut dyn GraphSink,
    seen: HashSet<[u8; 16]>,
    summary: GraphSummary,
    error: Option<AuditError>,
}

impl Graph<'_> {
    fn line(&mut self, line: &[u8], since: i64, until: i64) -> ControlFlow<()> {
        // Events are not exchanges; a record is recognised by its schema.
        if !line.starts_with(br#"{"schema":"custody.record/"#) {
            return ControlFlow::Continue(());
        }
        let Ok(r) = serde_json::from_slice::<Record>(line) else {
            self.summary.unreadable += 1;
            return ControlFlow::Continue(());
        };
        if !start_ms(&r.time.start).is_some_and(|ms| ms >= since && ms < until) {
            return ControlFlow::Continue(());
        }
        match self.record(&r) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    fn record(&mut self, r: &Record) -> Result<(), AuditError> {
        let g = r.gen_ai.as_ref();
        let requested = g.and_then(|g| g.request.model.as_deref());
        let response = g.and_then(|g| g.response.as_ref());
        let served = response.and_then(|x| x.model.as_deref());
        let usage = g.and_then(|g| g.usage.as_ref());
        let int = |v: Option<u64>| v.map_or(Prop::None, |v| Prop::Int(v as i64));
        fn opt(v: Option<&str>) -> Prop<'_> {
            v.map_or(Prop::None, Prop::Str)
        }
        self.sink
            .node(
                "Exchange",
                &r.id,
                &[
                    Prop::Int(r.seq as i64),
                    Prop::Str(&r.time.start),
                    int(r.http.status.map(u64::from)),
                    Prop::Str(&r.outcome),
                    opt(requested),
                    opt(served),
                    int(usage.and_then(|u| u.input_tokens)),
                    int(usage.and_then(|u| u.output_tokens)),
                ],
            )
            .map_err(io_err)?;
        self.summary.exchanges += 1;
        self.summary.nodes += 1;
        let id = r.id.as_str();
        self.remember("Exchange", id)?;
        if let Some(u) = &r.client.user {
            self.named("User", u)?;
            self.edge("ASKED", u, id, &[])?;
        }
        let links: [(&str, &str, Option<&str>); 9] = [
            ("WITH_KEY", "Key", r.client.key_id.as_deref()),
            ("FOR_TEAM", "Team", r.client.team.as_deref()),
            (
                "IN_SESSION",
                "Session",
                r.session.as_ref().map(|s| s.id.as_str()),
            ),
            (
                "IN_CONVERSATION",
                "Conversation",
                g.and_then(|g| g.conversation.as_ref())
                    .map(|c| c.id.as_str()),
            ),
            (
                "SENT",
                "Prompt",
                r.prompt.as_ref().and_then(|p| p.hash.as_deref()),
            ),
            (
                "RECEIVED",
                "Completion",
                r.completion.as_ref().map(|c| c.hash.as_str()),
            ),
            ("SERVED_BY", "Model", served),
            ("VIA_ROUTE", "Route", r.route.as_deref()),
            (
                "UNDER_CONFIG",
                "Config",
                r.config.as_ref().map(|c| c.version.as_str()),
            ),
        ];
        for (edge, label, to) in links {
            if let Some(to) = to {
                self.named(label, to)?;
                self.edge(edge, id, to, &[])?;
            }
        }
        if let Some(parent) = &r.chain.conversation_parent {
            // Only to an exchange the export holds (a parent before `since` is not):
            // loaders refuse an edge to a node they do not have.
            if self.seen.contains(&digest("Exchange", parent)) {
                self.edge("CONTINUES", id, parent, &[])?;
            }
        }
        for d in r.policy.iter().flat_map(|p| &p.decisions) {
            self.named("Policy", &d.name)?;
            let (effect, action, mode) = (name(&d.effect), name(&d.action), name(&d.mode));
            self.edge(
                "DECIDED_BY",
                id,
                &d.name,
                &[Prop::Str(&effect), Prop::Str(&action), Prop::Str(&mode)],
            )?;
        }
        Ok(())
    }

    /// Writes the node the first time it is named.
    fn named(&mut self, label: &str, id: &str) -> Result<(), AuditError> {
        if self.remember(label, id)? {
            self.summary.nodes += 1;
            self.sink.node(label, id, &[]).map_err(io_err)?;
        }
        Ok(())
    }

    /// Whether the node is new.
    fn remember(&mut self, label: &str, id: &str) -> Result<bool, AuditError> {
        let key = digest(label, id);
        if self.seen.contains(&key) {
            return Ok(false);
        }
        if self.seen.len() >= MAX_NODES {
            return Err(AuditError::Graph(format!(
                "more than {MAX_NODES} distinct nodes; narrow --since/--until"
            )));
        }
        Ok(self.seen.insert(key))
    }

    fn edge(
        &mut self,
        label: &str,
        from: &str,
        to: &str,
        props: &[Prop<'_>],
    ) -> Result<(), AuditError> {
        self.summary.edges += 1;
        self.sink.edge(label, from, to, props).map_err(io_err)
    }
}

fn digest(label: &str, id: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(label.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&h.finalize()[..16]);
    key
}

/// A config enum's name as it serializes (`blocked`, `block`, `enforce`).
fn name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The CSV layout graph databases import: one file per node label (`nodes/User.csv`,
/// header `id` then the properties) and per edge label (`edges/ASKED.csv`, header
/// `from,to` then the properties), and `kuzu.cypher`, the statements that create the
/// tables and load them into Kùzu (`kuzu DB < kuzu.cypher`, from the directory).
pub struct CsvDir {
    dir: PathBuf,
    nodes: Vec<csv::Writer<BufWriter<fs::File>>>,
    edges: Vec<csv::Writer<BufWriter<fs::File>>>,
}

impl CsvDir {
    /// Creates the directory (which must not hold a graph already) and the files.
    pub fn create(dir: &Path) -> Result<Self, AuditError> {
        let err = |e: io::Error| AuditError::Io {
            path: dir.to_owned(),
            source: e,
        };
        fs::create_dir_all(dir.join("nodes")).map_err(err)?;
        fs::create_dir_all(dir.join("edges")).map_err(err)?;
        let open = |path: PathBuf, header: Vec<&str>| -> Result<_, AuditError> {
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| AuditError::Io {
                    path: path.clone(),
                    source: e,
                })?;
            let mut w = csv::Writer::from_writer(BufWriter::new(file));
            w.write_record(header)
                .map_err(|e| AuditError::Graph(e.to_string()))?;
            Ok(w)
        };
        let mut nodes = Vec::new();
        for (label, props) in NODES {
            let header = std::iter::once("id")
                .chain(props.iter().map(|p| p.0))
                .collect();
            nodes.push(open(dir.join(format!("nodes/{label}.csv")), header)?);
        }
        let mut edges = Vec::new();
        for (label, _, _, props) in EDGES {
            let header = ["from", "to"]
                .into_iter()
                .chain(props.iter().map(|p| p.0))
                .collect();
            edges.push(open(dir.join(format!("edges/{label}.csv")), header)?);
        }
        fs::write(dir.join("kuzu.cypher"), kuzu_script()).map_err(err)?;
        Ok(Self {
            dir: dir.to_owned(),
            nodes,
            edges,
        })
    }
}

fn row(lead: &[&str], props: &[Prop<'_>]) -> csv::StringRecord {
    let mut r = csv::StringRecord::with_capacity(64, lead.len() + props.len());
    for s in lead {
        r.push_field(s);
    }
    for p in props {
        match p {
            Prop::Str(s) => r.push_field(s),
            Prop::Int(i) => r.push_field(&i.to_string()),
            Prop::None => r.push_field(""),
        }
    }
    r
}

fn csv_err(e: csv::Error) -> io::Error {
    io::Error::other(e)
}

impl GraphSink for CsvDir {
    fn node(&mut self, label: &str, id: &str, props: &[Prop<'_>]) -> io::Result<()> {
        let Some(i) = NODES.iter().position(|n| n.0 == label) else {
            return Err(io::Error::other(format!("no node label {label}")));
        };
        self.nodes[i]
            .write_record(&row(&[id], props))
            .map_err(csv_err)
    }

    fn edge(&mut self, label: &str, from: &str, to: &str, props: &[Prop<'_>]) -> io::Result<()> {
        let Some(i) = EDGES.iter().position(|e| e.0 == label) else {
            return Err(io::Error::other(format!("no edge label {label}")));
        };
        self.edges[i]
            .write_record(&row(&[from, to], props))
            .map_err(csv_err)
    }

    fn finish(self: Box<Self>) -> io::Result<()> {
        for mut w in self.nodes.into_iter().chain(self.edges) {
            w.flush()?;
            w.into_inner()
                .map_err(|e| io::Error::other(e.to_string()))?
                .into_inner()
                .map_err(|e| io::Error::other(e.to_string()))?
                .sync_all()?;
        }
        tracing::debug!(dir = %self.dir.display(), "graph written");
        Ok(())
    }
}

/// The Kùzu statements that load a [`CsvDir`]: tables, then `COPY` of each file
/// (serially: Kùzu's parallel reader refuses a quoted newline, and a client may name
/// itself with one).
pub fn kuzu_script() -> String {
    let ty = |t: &Type| match t {
        Type::Str => "STRING",
        Type::Int => "INT64",
    };
    let mut s = String::new();
    for (label, props) in NODES {
        let cols: String = props
            .iter()
            .map(|(p, t)| format!(", {p} {}", ty(t)))
            .collect();
        s.push_str(&format!(
            "CREATE NODE TABLE {label}(id STRING{cols}, PRIMARY KEY (id));\n"
        ));
    }
    for (label, from, to, props) in EDGES {
        let cols: String = props
            .iter()
            .map(|(p, t)| format!(", {p} {}", ty(t)))
            .collect();
        s.push_str(&format!(
            "CREATE REL TABLE {label}(FROM {from} TO {to}{cols});\n"
        ));
    }
    for (label, _) in NODES {
        s.push_str(&format!(
            "COPY {label} FROM 'nodes/{label}.csv' (HEADER=true, PARALLEL=false);\n"
        ));
    }
    for (label, ..) in EDGES {
        s.push_str(&format!(
            "COPY {label} FROM 'edges/{label}.csv' (HEADER=true, PARALLEL=false);\n"
        ));
    }
    s
}

/// GraphML (directed), as NetworkX, Gephi or yEd read it: node ids `Label:id`, each
/// node with `label` and `name` (and the exchange's properties), each edge with `label`
/// (and its properties).
pub struct GraphMl<W: Write> {
    out: quick_xml::Writer<W>,
}

impl<W: Write> GraphMl<W> {
    pub fn new(out: W) -> io::Result<Self> {
        use quick_xml::events::{BytesDecl, BytesStart, Event};
        let mut w = quick_xml::Writer::new_with_indent(out, b' ', 1);
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        w.write_event(Event::Start(BytesStart::new("graphml").with_attributes([
            ("xmlns", "http://graphml.graphdrawing.org/xmlns"),
        ])))?;
        let mut keys: Vec<(&str, &str, &str)> =
            vec![("node", "label", "string"), ("node", "name", "string")];
        for (_, props) in NODES {
            for (p, t) in props.iter() {
                keys.push(("node", p, if *t == Type::Int { "long" } else { "string" }));
            }
        }
        keys.push(("edge", "label", "string"));
        for (.., props) in EDGES {
            for (p, _) in props.iter() {
                keys.push(("edge", p, "string"));
            }
        }
        for (on, name, ty) in keys {
            let id = format!("{on}_{name}");
            w.create_element("key")
                .with_attributes([
                    ("id", id.as_str()),
                    ("for", on),
                    ("attr.name", name),
                    ("attr.type", ty),
                ])
                .write_empty()?;
        }
        w.write_event(Event::Start(
            BytesStart::new("graph").with_attributes([("edgedefault", "directed")]),
        ))?;
        Ok(Self { out: w })
    }

    fn data(&mut self, key: &str, value: &str) -> io::Result<()> {
        self.out
            .create_element("data")
            .with_attribute(("key", key))
            .write_text_content(quick_xml::events::BytesText::new(&xml_safe(value)))?;
        Ok(())
    }
}

impl<W: Write> GraphSink for GraphMl<W> {
    fn node(&mut self, label: &str, id: &str, props: &[Prop<'_>]) -> io::Result<()> {
        use quick_xml::events::{BytesEnd, BytesStart, Event};
        let gid = format!("{label}:{}", xml_safe(id));
        self.out.write_event(Event::Start(
            BytesStart::new("node").with_attributes([("id", gid.as_str())]),
        ))?;
        self.data("node_label", label)?;
        self.data("node_name", id)?;
        let names = NODES.iter().find(|n| n.0 == label).map_or(&[][..], |n| n.1);
        for ((p, _), v) in names.iter().zip(props) {
            match v {
                Prop::Str(s) => self.data(&format!("node_{p}"), s)?,
                Prop::Int(i) => self.data(&format!("node_{p}"), &i.to_string())?,
                Prop::None => {}
            }
        }
        self.out.write_event(Event::End(BytesEnd::new("node")))?;
        Ok(())
    }

    fn edge(&mut self, label: &str, from: &str, to: &str, props: &[Prop<'_>]) -> io::Result<()> {
        use quick_xml::events::{BytesEnd, BytesStart, Event};
        let Some((_, fl, tl, names)) = EDGES.iter().find(|e| e.0 == label) else {
            return Err(io::Error::other(format!("no edge label {label}")));
        };
        let (source, target) = (
            format!("{fl}:{}", xml_safe(from)),
            format!("{tl}:{}", xml_safe(to)),
        );
        self.out.write_event(Event::Start(
            BytesStart::new("edge")
                .with_attributes([("source", source.as_str()), ("target", target.as_str())]),
        ))?;
        self.data("edge_label", label)?;
        for ((p, _), v) in names.iter().zip(props) {
            if let Prop::Str(s) = v {
                self.data(&format!("edge_{p}"), s)?;
            }
        }
        self.out.write_event(Event::End(BytesEnd::new("edge")))?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        use quick_xml::events::{BytesEnd, Event};
        self.out.write_event(Event::End(BytesEnd::new("graph")))?;
        self.out.write_event(Event::End(BytesEnd::new("graphml")))?;
        self.out.get_mut().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_stay_well_formed_xml_and_csv() {
        let name = "eve\u{1}<graph>&\"x\",\ny";
        let mut xml = Vec::new();
        let mut g = Box::new(GraphMl::new(&mut xml).unwrap());
        g.node("User", name, &[]).unwrap();
        g.edge("ASKED", name, "e1", &[]).unwrap();
        g.finish().unwrap();
        let xml = String::from_utf8(xml).unwrap();
        assert!(!xml.contains('\u{1}') && !xml.contains("<graph>&"), "{xml}");
        assert!(xml.contains("eve\u{FFFD}&lt;graph&gt;&amp;"), "{xml}");

        let dir = tempfile::tempdir().unwrap();
        let mut csv = Box::new(CsvDir::create(dir.path()).unwrap());
        csv.node("User", name, &[]).unwrap();
        csv.finish().unwrap();
        let mut r = csv::Reader::from_path(dir.path().join("nodes/User.csv")).unwrap();
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(&rows[0][0], name, "quoted, read back whole");
    }

    #[test]
    fn the_kuzu_script_creates_every_table_before_it_loads_them() {
        let s = kuzu_script();
        let first_copy = s.find("COPY").unwrap();
        assert_eq!(
            s[..first_copy].matches("CREATE").count(),
            NODES.len() + EDGES.len()
        );
        assert_eq!(
            s[first_copy..].matches("COPY").count(),
            NODES.len() + EDGES.len()
        );
    }
}
