//! `custody log export --format parquet`: the trail as a Parquet file that DuckDB,
//! Athena, Trino, ClickHouse or Spark query directly.
//!
//! One row per line of the trail (records and events). The fields reviewers filter and
//! group on are typed columns; `record` holds the whole line as stored, so anything
//! else is one JSON function away and the line's hash can still be re-checked. Integer
//! columns are signed: Athena and Trino have no unsigned types.

use std::{io::Write, sync::Arc};

use arrow_array::{
    builder::{
        BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
        TimestampMicrosecondBuilder,
    },
    ArrayRef, RecordBatch,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::{
    arrow::ArrowWriter,
    basic::{Compression, ZstdLevel},
    file::properties::WriterProperties,
};
use serde_json::Value;

use crate::AuditError;

#[derive(Clone, Copy)]
enum Kind {
    Str,
    I64,
    I32,
    F64,
    Bool,
    /// An RFC 3339 string, stored as microseconds since the epoch, UTC.
    Time,
    /// An object, stored as its JSON text (DuckDB: `redactions->>'$.EMAIL_ADDRESS'`).
    Json,
}

/// Column name, where in the line (a JSON pointer), type. `trail` and `record` are added
/// around these.
const COLUMNS: &[(&str, &str, Kind)] = &[
    ("id", "/id", Kind::Str),
    ("seq", "/seq", Kind::I64),
    ("schema", "/schema", Kind::Str),
    ("event_type", "/event/type", Kind::Str),
    ("time_start", "/time/start", Kind::Time),
    ("duration_ms", "/time/duration_ms", Kind::F64),
    ("ttfb_ms", "/time/ttfb_ms", Kind::F64),
    ("route", "/route", Kind::Str),
    ("method", "/http/method", Kind::Str),
    ("path", "/http/path", Kind::Str),
    ("status", "/http/status", Kind::I32),
    ("outcome", "/outcome", Kind::Str),
    ("error", "/error", Kind::Str),
    ("provider", "/gen_ai/provider/name", Kind::Str),
    ("operation", "/gen_ai/operation/name", Kind::Str),
    ("request_model", "/gen_ai/request/model", Kind::Str),
    ("response_model", "/gen_ai/response/model", Kind::Str),
    ("stream", "/gen_ai/request/stream", Kind::Bool),
    ("input_tokens", "/gen_ai/usage/input_tokens", Kind::I64),
    ("output_tokens", "/gen_ai/usage/output_tokens", Kind::I64),
    ("key_id", "/client/key_id", Kind::Str),
    ("user", "/client/user", Kind::Str),
    ("team", "/client/team", Kind::Str),
    ("end_user", "/client/end_user", Kind::Str),
    ("pod", "/source/k8s.pod.name", Kind::Str),
    ("namespace", "/source/k8s.namespace.name", Kind::Str),
    ("trace_id", "/trace/id", Kind::Str),
    ("session_id", "/session/id", Kind::Str),
    ("prompt_hash", "/prompt/hash", Kind::Str),
    ("completion_hash", "/completion/hash", Kind::Str),
    (
        "conversation_parent",
        "/chain/conversation_parent",
        Kind::Str,
    ),
    ("config_version", "/config/version", Kind::Str),
    ("redactions", "/redactions", Kind::Json),
    ("record_hash", "/chain/hash", Kind::Str),
];

/// Rows per record batch (and the writer's unit of memory).
const BATCH_ROWS: usize = 8192;

enum Column {
    Str(StringBuilder),
    I64(Int64Builder),
    I32(Int32Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Time(TimestampMicrosecondBuilder),
}

impl Column {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Str | Kind::Json => Self::Str(StringBuilder::new()),
            Kind::I64 => Self::I64(Int64Builder::new()),
            Kind::I32 => Self::I32(Int32Builder::new()),
            Kind::F64 => Self::F64(Float64Builder::new()),
            Kind::Bool => Self::Bool(BooleanBuilder::new()),
            Kind::Time => Self::Time(TimestampMicrosecondBuilder::new().with_timezone("UTC")),
        }
    }

    /// Appends the value, or null where it is absent or of another type.
    fn push(&mut self, v: Option<&Value>) {
        match self {
            Self::Str(b) => match v {
                Some(Value::String(s)) => b.append_value(s),
                Some(o @ Value::Object(_)) => b.append_value(o.to_string()),
                _ => b.append_null(),
            },
            Self::I64(b) => b.append_option(v.and_then(Value::as_i64)),
            Self::I32(b) => b.append_option(
                v.and_then(Value::as_i64)
                    .and_then(|n| i32::try_from(n).ok()),
            ),
            Self::F64(b) => b.append_option(v.and_then(Value::as_f64)),
            Self::Bool(b) => b.append_option(v.and_then(Value::as_bool)),
            Self::Time(b) => b.append_option(
                v.and_then(Value::as_str)
                    .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .and_then(|d| i64::try_from(d.as_micros()).ok()),
            ),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Str(b) => Arc::new(b.finish()),
            Self::I64(b) => Arc::new(b.finish()),
            Self::I32(b) => Arc::new(b.finish()),
            Self::F64(b) => Arc::new(b.finish()),
            Self::Bool(b) => Arc::new(b.finish()),
            Self::Time(b) => Arc::new(b.finish()),
        }
    }
}

fn data_type(kind: Kind) -> DataType {
    match kind {
        Kind::Str | Kind::Json => DataType::Utf8,
        Kind::I64 => DataType::Int64,
        Kind::I32 => DataType::Int32,
        Kind::F64 => DataType::Float64,
        Kind::Bool => DataType::Boolean,
        Kind::Time => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    }
}

/// The export's Arrow schema: `trail`, the typed columns, then `record`.
pub fn schema() -> SchemaRef {
    let mut fields = vec![Field::new("trail", DataType::Utf8, false)];
    fields.extend(
        COLUMNS
            .iter()
            .map(|(name, _, kind)| Field::new(*name, data_type(*kind), true)),
    );
    fields.push(Field::new("record", DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

fn export_err(e: impl std::fmt::Display) -> AuditError {
    AuditError::Export(e.to_string())
}

/// Writes trail lines as Parquet (zstd-compressed), a batch at a time.
pub struct ParquetExport<W: Write + Send> {
    writer: ArrowWriter<W>,
    schema: SchemaRef,
    trail: StringBuilder,
    columns: Vec<Column>,
    record: StringBuilder,
    rows: usize,
    /// Rows written in all.
    pub total: u64,
}

impl<W: Write + Send> ParquetExport<W> {
    pub fn new(out: W) -> Result<Self, AuditError> {
        let schema = schema();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let writer = ArrowWriter::try_new(out, schema.clone(), Some(props)).map_err(export_err)?;
        Ok(Self {
            writer,
            schema,
            trail: StringBuilder::new(),
            columns: COLUMNS.iter().map(|(_, _, k)| Column::new(*k)).collect(),
            record: StringBuilder::new(),
            rows: 0,
            total: 0,
        })
    }

    /// Adds one stored line of the trail named `trail` (a line that is not JSON keeps
    /// only its `record` column).
    pub fn push(&mut self, trail: &str, line: &[u8]) -> Result<(), AuditError> {
        let v: Option<Value> = serde_json::from_slice(line).ok();
        self.trail.append_value(trail);
        for ((_, pointer, _), col) in COLUMNS.iter().zip(&mut self.columns) {
            col.push(v.as_ref().and_then(|v| v.pointer(pointer)));
        }
        self.record.append_value(String::from_utf8_lossy(line));
        self.rows += 1;
        self.total += 1;
        if self.rows == BATCH_ROWS {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), AuditError> {
        if self.rows == 0 {
            return Ok(());
        }
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(self.trail.finish())];
        arrays.extend(self.columns.iter_mut().map(Column::finish));
        arrays.push(Arc::new(self.record.finish()));
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(export_err)?;
        self.writer.write(&batch).map_err(export_err)?;
        self.rows = 0;
        Ok(())
    }

    /// Writes what is buffered and the file's footer.
    pub fn finish(mut self) -> Result<u64, AuditError> {
        self.flush_batch()?;
        self.writer.close().map_err(export_err)?;
        Ok(self.total)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use arrow_array::{Array, Int32Array, StringArray, TimestampMicrosecondArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn lines_become_typed_rows_and_read_back() {
        let lines = [
            r#"{"schema":"custody.event/v1","id":"e1","seq":1,"time":{"start":"2026-11-29T10:00:00.000Z"},"event":{"type":"config"}}"#,
            r#"{"schema":"custody.record/v1","id":"r1","seq":2,"route":"openai","time":{"start":"2026-11-29T10:00:01.250Z","duration_ms":3.5},"http":{"status":200},"gen_ai":{"request":{"model":"gpt-4o","stream":true},"usage":{"input_tokens":12}},"source":{"k8s.pod.name":"pod-a"},"redactions":{"EMAIL_ADDRESS":2}}"#,
            "not json",
        ];
        let mut buf = Vec::new();
        let mut export = ParquetExport::new(&mut buf).unwrap();
        for l in lines {
            export.push("here", l.as_bytes()).unwrap();
        }
        assert_eq!(export.finish().unwrap(), 3);

        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(buf))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
        let b = &batches[0];
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let strs = |n: &str| {
            col(n)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        assert_eq!(strs("event_type").value(0), "config");
        assert!(strs("event_type").is_null(1));
        assert_eq!(strs("request_model").value(1), "gpt-4o");
        assert_eq!(strs("pod").value(1), "pod-a");
        assert_eq!(strs("redactions").value(1), r#"{"EMAIL_ADDRESS":2}"#);
        assert!(strs("redactions").is_null(0));
        assert_eq!(strs("record").value(2), "not json");
        assert_eq!(strs("trail").value(2), "here");
        let status = col("status");
        let status = status.as_any().downcast_ref::<Int32Array>().unwrap();
        assert_eq!(status.value(1), 200);
        let t = col("time_start");
        let t = t
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        assert_eq!(t.value(1) - t.value(0), 1_250_000);
    }
}
