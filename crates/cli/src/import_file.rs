//! `tessera import FILE`: streams cards (or bank accounts and contact data) from a CSV or
//! JSON-lines file to the gateway's bulk import, shows progress, and writes one result line
//! per input line (its token, or its own error). Every line ends up in the results file as a
//! token or as the reason it was not imported, whatever happens to the stream, and the
//! command exits non-zero unless every line was imported.
//!
//! CSV needs a header; recognised columns: `number`, `expiry_month`, `expiry_year`,
//! `holder_name`, `shopper_reference`, `merchant_id`, `iban`, `bic`, `email`, `phone`. JSON
//! lines are objects with the same keys.

use std::collections::BTreeSet;
use std::io::{BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use serde::Deserialize;
use tessera_api::error_details::decode_error_info;
use tessera_api::limits::{MAX_IMPORT_ITEMS, MAX_IMPORT_MESSAGE_BYTES};
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    import_result, tokenize_request, BankAccount, Card, Contact, ImportItem, ImportRequest, TokenFormat,
    TokenKind, TokenizeRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroize;

/// Items per request message: large enough to amortise the stream's framing, small enough
/// that the gateway works on several chunks at once. Messages are also cut by size, so long
/// lines never push one over the gateway's byte limit.
const ITEMS_PER_MESSAGE: usize = 500;
const _: () = assert!(ITEMS_PER_MESSAGE <= MAX_IMPORT_ITEMS);

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A `.csv` file with a header, or a `.jsonl` / `.ndjson` file of objects.
    pub file: PathBuf,
    /// Merchant for lines that do not name one.
    #[arg(long)]
    pub merchant: Option<String>,
    /// Token kind for every line: card_on_file, recurrence or single_use.
    #[arg(long, default_value = "card_on_file")]
    pub kind: String,
    /// Token format: opaque or format_preserving.
    #[arg(long, default_value = "opaque")]
    pub format: String,
    /// The gateway's public address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub gateway: SocketAddr,
    /// Directory of the PKI (ca.pem and the client certificate).
    #[arg(long, default_value = "certs")]
    pub certs_dir: PathBuf,
    /// Client certificate name in the certs directory (NAME.pem, NAME-key.pem).
    #[arg(long, default_value = "dev-client")]
    pub client: String,
    /// Where to write `line,token,error` results (default: FILE.results.csv).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar (for scripts and CI logs).
    #[arg(long)]
    pub quiet: bool,
}

/// One input line, as read. Wiped when dropped: it holds card data.
#[derive(Default, Deserialize, Zeroize)]
#[zeroize(drop)]
struct Line {
    #[serde(default)]
    number: String,
    #[serde(default)]
    expiry_month: u32,
    #[serde(default)]
    expiry_year: u32,
    #[serde(default)]
    holder_name: String,
    #[serde(default)]
    shopper_reference: String,
    #[serde(default)]
    merchant_id: String,
    #[serde(default)]
    iban: String,
    #[serde(default)]
    bic: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    phone: String,
}

impl Line {
    fn into_request(mut self, args: &ImportArgs, kind: TokenKind, format: TokenFormat) -> TokenizeRequest {
        let data = if !self.iban.is_empty() {
            tokenize_request::Data::BankAccount(BankAccount {
                iban: std::mem::take(&mut self.iban),
                bic: std::mem::take(&mut self.bic),
                holder_name: std::mem::take(&mut self.holder_name),
            })
        } else if !self.email.is_empty() || !self.phone.is_empty() {
            tokenize_request::Data::Contact(Contact {
                email: std::mem::take(&mut self.email),
                phone: std::mem::take(&mut self.phone),
            })
        } else {
            tokenize_request::Data::Card(Card {
                number: std::mem::take(&mut self.number),
                expiry_month: self.expiry_month,
                expiry_year: self.expiry_year,
                holder_name: std::mem::take(&mut self.holder_name),
            })
        };
        let merchant_id = if self.merchant_id.is_empty() {
            args.merchant.clone().unwrap_or_default()
        } else {
            std::mem::take(&mut self.merchant_id)
        };
        TokenizeRequest {
            merchant_id,
            data: Some(data),
            format: format as i32,
            shopper_reference: std::mem::take(&mut self.shopper_reference),
            kind: kind as i32,
            ..Default::default()
        }
    }
}

/// A line number and the line, or why it could not be read.
type NumberedLine = (u64, Result<Line, String>);

/// Reads every line of the file (numbered from 1, after a CSV header) or says which one is
/// malformed.
fn read_lines(path: &Path) -> Result<Vec<NumberedLine>, String> {
    let is_json = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "ndjson" | "json")
    );
    let mut lines = Vec::new();
    if is_json {
        let file =
            std::fs::File::open(path).map_err(|err| format!("cannot open {}: {err}", path.display()))?;
        for (number, text) in std::io::BufReader::new(file).lines().enumerate() {
            let mut text = text.map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            if !text.trim().is_empty() {
                let line = serde_json::from_str::<Line>(&text)
                    .map_err(|err| format!("not a JSON object ({})", err.classify_name()));
                lines.push((number as u64 + 1, line));
            }
            text.zeroize();
        }
    } else {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(true)
            .from_path(path)
            .map_err(|err| format!("cannot open {}: {err}", path.display()))?;
        for (number, record) in reader.deserialize::<Line>().enumerate() {
            // Errors name the position and kind, never the field's contents.
            let line = record.map_err(|err| match err.kind() {
                csv::ErrorKind::Deserialize { err, .. } => format!(
                    "bad value in column {}",
                    err.field().map_or("?".into(), |f| f.to_string())
                ),
                _ => "malformed CSV line".to_owned(),
            });
            lines.push((number as u64 + 1, line));
        }
    }
    Ok(lines)
}

trait JsonErrorName {
    fn classify_name(&self) -> &'static str;
}

impl JsonErrorName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong field type",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

fn parse_kind(kind: &str) -> Result<TokenKind, String> {
    TokenKind::from_str_name(&format!("TOKEN_KIND_{}", kind.to_ascii_uppercase()))
        .ok_or_else(|| format!("unknown kind {kind}"))
}

fn parse_format(format: &str) -> Result<TokenFormat, String> {
    TokenFormat::from_str_name(&format!("TOKEN_FORMAT_{}", format.to_ascii_uppercase()))
        .ok_or_else(|| format!("unknown format {format}"))
}

/// Quotes a CSV field if it needs it.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Splits items into request messages of at most [`ITEMS_PER_MESSAGE`] items and
/// [`MAX_IMPORT_MESSAGE_BYTES`] encoded; an item too large for any message is returned apart
/// with its sequence, to be reported instead of sent.
fn into_messages(items: Vec<ImportItem>) -> (Vec<ImportRequest>, Vec<u64>) {
    let mut messages = Vec::new();
    let mut too_large = Vec::new();
    let mut current = ImportRequest::default();
    let mut current_bytes = 0usize;
    for item in items {
        // A repeated field's element costs its tag byte, its length prefix and its body.
        let body = item.encoded_len();
        let framed = 1 + prost::length_delimiter_len(body) + body;
        if framed > MAX_IMPORT_MESSAGE_BYTES {
            too_large.push(item.sequence);
            continue;
        }
        if current.items.len() == ITEMS_PER_MESSAGE || current_bytes + framed > MAX_IMPORT_MESSAGE_BYTES {
            messages.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += framed;
        current.items.push(item);
    }
    if !current.items.is_empty() {
        messages.push(current);
    }
    (messages, too_large)
}

/// How an import went: lines imported and lines not imported (each named in the results file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportSummary {
    pub succeeded: u64,
    pub failed: u64,
}

/// "REASON: message" of a gRPC error, from its ErrorInfo when it has one.
fn describe(status: &tonic::Status) -> String {
    let reason = decode_error_info(status.details())
        .map_or_else(|| format!("{:?}", status.code()), |info| info.reason);
    format!("{reason}: {}", status.message())
}

/// Runs the import and writes the results file. Returns how many lines were and were not
/// imported; an error only when the import could not start (no file, no gateway).
pub async fn run(args: ImportArgs) -> Result<ImportSummary, String> {
    let kind = parse_kind(&args.kind)?;
    let format = parse_format(&args.format)?;
    let lines = read_lines(&args.file)?;
    let total = lines.len() as u64;
    let out_path = args.out.clone().unwrap_or_else(|| {
        let mut name = args.file.clone().into_os_string();
        name.push(".results.csv");
        PathBuf::from(name)
    });
    let out = std::fs::File::create(&out_path)
        .map_err(|err| format!("cannot create {}: {err}", out_path.display()))?;
    let mut out = BufWriter::new(out);
    writeln!(out, "line,token,error").map_err(|err| err.to_string())?;

    let read = |name: &str| {
        let path = args.certs_dir.join(name);
        std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(
            read(&format!("{}.pem", args.client))?,
            read(&format!("{}-key.pem", args.client))?,
        ))
        .domain_name("tessera-gateway");
    let channel = Endpoint::from_shared(format!("https://{}", args.gateway))
        .and_then(|endpoint| endpoint.tls_config(tls))
        .map_err(|err| err.to_string())?
        .connect()
        .await
        .map_err(|err| format!("cannot connect to the gateway at {}: {err}", args.gateway))?;
    let mut client = TokenizationClient::new(channel);

    // Lines that do not even parse, or are too large to send, are answered here; the rest
    // stream to the gateway.
    let mut failed = 0u64;
    let mut items = Vec::with_capacity(lines.len());
    for (number, line) in lines {
        match line {
            Ok(line) => items.push(ImportItem {
                sequence: number,
                item: Some(line.into_request(&args, kind, format)),
            }),
            Err(why) => {
                failed += 1;
                writeln!(out, "{number},,{}", csv_field(&format!("INVALID_LINE: {why}")))
                    .map_err(|err| err.to_string())?;
            }
        }
    }
    let (messages, too_large) = into_messages(items);
    for number in too_large {
        failed += 1;
        let why = format!(
            "LINE_TOO_LARGE: the line does not fit in one import message of {MAX_IMPORT_MESSAGE_BYTES} bytes"
        );
        writeln!(out, "{number},,{}", csv_field(&why)).map_err(|err| err.to_string())?;
    }
    // Every line sent is owed a result; what is still owed when the stream ends was not
    // imported, and says so.
    let mut unanswered: BTreeSet<u64> = messages
        .iter()
        .flat_map(|message| message.items.iter().map(|item| item.sequence))
        .collect();
    let (requests, outbound) = mpsc::channel(8);
    let sender = tokio::spawn(async move {
        for message in messages {
            if requests.send(message).await.is_err() {
                return;
            }
        }
    });

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} lines, {per_sec}, eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.inc(failed);
    let started = Instant::now();
    let mut succeeded = 0u64;
    // Why the stream ended before every line had its result, if it did.
    let mut stream_error = None;
    match client.import_tokens(ReceiverStream::new(outbound)).await {
        Err(status) => stream_error = Some(describe(&status)),
        Ok(responses) => {
            let mut responses = responses.into_inner();
            loop {
                let response = match responses.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => break,
                    Err(status) => {
                        stream_error = Some(describe(&status));
                        break;
                    }
                };
                for result in response.results {
                    if !unanswered.remove(&result.sequence) {
                        // Not a line of ours, or answered twice: nothing to write twice.
                        continue;
                    }
                    match result.outcome {
                        Some(import_result::Outcome::Token(token)) => {
                            succeeded += 1;
                            writeln!(out, "{},{},", result.sequence, token.token)
                                .map_err(|err| err.to_string())?;
                        }
                        Some(import_result::Outcome::Error(error)) => {
                            failed += 1;
                            let text = format!("{}: {}", error.reason, error.message);
                            writeln!(out, "{},,{}", result.sequence, csv_field(&text))
                                .map_err(|err| err.to_string())?;
                        }
                        None => {
                            failed += 1;
                            writeln!(
                                out,
                                "{},,NO_OUTCOME: the gateway gave no outcome",
                                result.sequence
                            )
                            .map_err(|err| err.to_string())?;
                        }
                    }
                    bar.inc(1);
                }
                bar.set_message(format!("({succeeded} ok, {failed} failed)"));
            }
        }
    }
    sender.abort();
    let why = stream_error.clone().unwrap_or_else(|| {
        "NO_RESULT: the gateway ended the import without a result for this line".to_owned()
    });
    for number in &unanswered {
        failed += 1;
        writeln!(out, "{number},,{}", csv_field(&format!("NOT_IMPORTED: {why}")))
            .map_err(|err| err.to_string())?;
    }
    bar.finish_and_clear();
    out.flush().map_err(|err| err.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "imported {succeeded} of {total} lines ({failed} failed) in {seconds:.2} s ({:.0} lines/s); results in {}",
        (succeeded + failed) as f64 / seconds.max(1e-9),
        out_path.display()
    );
    if let Some(why) = stream_error {
        eprintln!(
            "the import stream ended early ({why}); {} lines sent were not imported",
            unanswered.len()
        );
    }
    Ok(ImportSummary { succeeded, failed })
}

#[cfg(test)]
mod tests {
    use tessera_api::v1::{tokenize_request, Card, TokenizeRequest};

    use super::*;

    fn item(sequence: u64, holder_bytes: usize) -> ImportItem {
        ImportItem {
            sequence,
            item: Some(TokenizeRequest {
                merchant_id: "m_import".into(),
                data: Some(tokenize_request::Data::Card(Card {
                    number: "4111111111111111".into(),
                    expiry_month: 12,
                    expiry_year: 2030,
                    holder_name: "h".repeat(holder_bytes),
                })),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn messages_stay_within_both_limits_whatever_the_line_lengths() {
        // Short lines are cut by count, long ones by size; nothing is dropped or reordered.
        let items: Vec<_> = (1..=3000)
            .map(|n| item(n, if n % 3 == 0 { 8000 } else { 40 }))
            .collect();
        let (messages, too_large) = into_messages(items);
        assert!(too_large.is_empty());
        let mut sequences = Vec::new();
        for message in &messages {
            assert!(message.items.len() <= ITEMS_PER_MESSAGE);
            assert!(
                message.encoded_len() <= MAX_IMPORT_MESSAGE_BYTES,
                "{}",
                message.encoded_len()
            );
            sequences.extend(message.items.iter().map(|item| item.sequence));
        }
        assert_eq!(sequences, (1..=3000).collect::<Vec<_>>());
        assert!(
            messages.len() > 3000 / ITEMS_PER_MESSAGE,
            "long lines must cut messages by size"
        );
    }

    #[test]
    fn a_line_too_large_for_any_message_is_set_apart() {
        let items = vec![item(1, 10), item(2, MAX_IMPORT_MESSAGE_BYTES), item(3, 10)];
        let (messages, too_large) = into_messages(items);
        assert_eq!(too_large, vec![2]);
        let sent: Vec<u64> = messages
            .iter()
            .flat_map(|m| m.items.iter().map(|i| i.sequence))
            .collect();
        assert_eq!(sent, vec![1, 3]);
    }
}
