//! Micro-benchmarks of the two per-row hot paths, in rows per second (`cargo bench`):
//! the pgoutput decoder, and the Arrow batch builder that turns decoded tuples into raw
//! change rows. Rows are shaped like the demo's `transacoes` (15 columns: integers,
//! text, numeric, date, timestamptz, jsonb, nulls), as Postgres sends them.

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use wal2delta::change::message::PgOutputMessage;
use wal2delta::change::{ChangeMeta, ColumnSpec, Op, Xid};
use wal2delta::lake::raw::layout::RawBatchBuilder;
use wal2delta::lsn::Lsn;
use wal2delta::pg_types::ColumnKind;
use wal2delta::source::pgoutput::decode;

const ROWS: usize = 10_000;

/// transacoes' columns: (name, type OID, typmod).
const COLUMNS: [(&str, u32, i32); 15] = [
    ("id", 20, -1),
    ("imovel_id", 20, -1),
    ("morador_id", 20, -1),
    ("tipo", 25, -1),
    ("status", 25, -1),
    ("valor", 1700, (12 << 16 | 2) + 4),
    ("competencia", 1042, 11),
    ("vencimento", 1082, -1),
    ("pago_em", 1184, -1),
    ("detalhes", 3802, -1),
    ("data_pagamento_informada", 25, -1),
    ("valor_informado", 25, -1),
    ("criado_em", 1184, -1),
    ("observacao", 25, -1),
    ("versao", 23, -1),
];

/// Row `i`'s values in Postgres text output (None: NULL).
fn values(i: usize) -> Vec<Option<String>> {
    vec![
        Some(i.to_string()),
        Some((1 + i % 400).to_string()),
        (!i.is_multiple_of(3)).then(|| (1 + i % 900).to_string()),
        Some(["taxa_condominial", "multa", "acordo"][i % 3].to_string()),
        Some(["aberta", "paga", "atrasada"][i % 3].to_string()),
        Some(format!("{}.{:02}", 100 + i % 5000, i % 100)),
        Some(format!("2025-{:02}", 1 + i % 12)),
        Some(format!("2025-{:02}-10", 1 + i % 12)),
        i.is_multiple_of(2)
            .then(|| format!("2025-03-{:02} 13:45:12.123456+00", 1 + i % 28)),
        Some(format!(r#"{{"lote": {i}, "origem": "boleto"}}"#)),
        i.is_multiple_of(5).then(|| "05/01/2024".to_string()),
        i.is_multiple_of(5).then(|| "R$ 1.234,56".to_string()),
        Some("2025-01-05 08:00:00+00".to_string()),
        None,
        Some((i % 7).to_string()),
    ]
}

/// An Insert message (`I`, relation id, `N`, tuple) as pgoutput encodes it.
fn insert_message(i: usize) -> Bytes {
    let row = values(i);
    let mut m = vec![b'I'];
    m.extend(16_384u32.to_be_bytes());
    m.push(b'N');
    m.extend((row.len() as i16).to_be_bytes());
    for value in &row {
        if let Some(text) = value {
            m.push(b't');
            m.extend((text.len() as i32).to_be_bytes());
            m.extend_from_slice(text.as_bytes());
        } else {
            m.push(b'n');
        }
    }
    Bytes::from(m)
}

fn decoder(c: &mut Criterion) {
    let messages: Vec<Bytes> = (0..ROWS).map(insert_message).collect();
    let mut group = c.benchmark_group("pgoutput decoder");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("insert, 15 columns", |b| {
        b.iter(|| {
            for m in &messages {
                let decoded = decode(m).expect("well-formed");
                std::hint::black_box(decoded);
            }
        })
    });
    group.finish();
}

fn builder(c: &mut Criterion) {
    let columns: Vec<ColumnSpec> = COLUMNS
        .iter()
        .map(|&(name, type_oid, type_modifier)| ColumnSpec {
            name: name.to_string(),
            kind: ColumnKind::from_pg(type_oid, type_modifier),
            type_oid,
            type_modifier,
        })
        .collect();
    let positions: Vec<Option<usize>> = (0..columns.len()).map(Some).collect();
    let tuples: Vec<_> = (0..ROWS)
        .map(|i| match decode(&insert_message(i)).expect("well-formed") {
            PgOutputMessage::Insert { new, .. } => new,
            other => panic!("not an insert: {other:?}"),
        })
        .collect();
    let mut group = c.benchmark_group("raw batch builder");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("append + finish, 15 columns", |b| {
        b.iter_batched(
            || RawBatchBuilder::new(columns.clone()),
            |mut builder| {
                for (i, tuple) in tuples.iter().enumerate() {
                    let meta = ChangeMeta {
                        commit_lsn: Lsn(1_000),
                        lsn: Lsn(1_000 + i as u64),
                        commit_ts: 1_700_000_000_000_000,
                        xid: Xid(7),
                        seq: i as i64,
                    };
                    builder.append(Op::Insert, meta, Some(tuple), &positions, None);
                }
                builder.finish().expect("valid batch")
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decoder, builder);
criterion_main!(benches);
