//! `tessera import FILE`: streams cards (or bank accounts and contact data) from a CSV or
//! JSON-lines file to the gateway's bulk import, shows progress, and writes one result line
//! per input line (its token, or its own error).
//!
//! CSV needs a header; recognised columns: `number`, `expiry_month`, `expiry_year`,
//! `holder_name`, `shopper_reference`, `merchant_id`, `iban`, `bic`, `email`, `phone`. JSON
//! lines are objects with the same keys.

use std::io::{BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
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
/// that the gateway works on several chunks at once.
const ITEMS_PER_MESSAGE: usize = 500;

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

/// Runs the import; returns (succeeded, failed).
pub async fn run(args: ImportArgs) -> Result<(u64, u64), String> {
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

    // Lines that do not even parse are answered here; the rest stream to the gateway.
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
    let (requests, outbound) = mpsc::channel(8);
    let sender = tokio::spawn(async move {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let chunk: Vec<ImportItem> = items.by_ref().take(ITEMS_PER_MESSAGE).collect();
            if requests.send(ImportRequest { items: chunk }).await.is_err() {
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
    let mut responses = client
        .import_tokens(ReceiverStream::new(outbound))
        .await
        .map_err(|status| status.message().to_owned())?
        .into_inner();
    let mut succeeded = 0u64;
    while let Some(response) = responses
        .message()
        .await
        .map_err(|status| format!("import failed: {}", status.message()))?
    {
        for result in response.results {
            match result.outcome {
                Some(import_result::Outcome::Token(token)) => {
                    succeeded += 1;
                    writeln!(out, "{},{},", result.sequence, token.token).map_err(|err| err.to_string())?;
                }
                Some(import_result::Outcome::Error(error)) => {
                    failed += 1;
                    let text = format!("{}: {}", error.reason, error.message);
                    writeln!(out, "{},,{}", result.sequence, csv_field(&text))
                        .map_err(|err| err.to_string())?;
                }
                None => failed += 1,
            }
            bar.inc(1);
        }
        if let Some(progress) = response.progress {
            bar.set_message(format!(
                "({} ok, {} failed)",
                progress.succeeded,
                progress.failed + (failed - progress.failed.min(failed))
            ));
        }
    }
    let _ = sender.await;
    bar.finish_and_clear();
    out.flush().map_err(|err| err.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "imported {succeeded} of {total} lines ({failed} failed) in {seconds:.2} s ({:.0} lines/s); results in {}",
        (succeeded + failed) as f64 / seconds.max(1e-9),
        out_path.display()
    );
    Ok((succeeded, failed))
}
