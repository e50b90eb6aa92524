//! Generates Rust code for Tessera's protobuf API with a pure-Rust proto compiler (protox),
//! so building needs no system `protoc`. The same descriptor set is embedded for gRPC server
//! reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/tessera/v1/tessera.proto",
    "proto/tessera/vault/v1/vault.proto",
    "proto/google/rpc/status.proto",
    "proto/tessera/bench/v1/floor.proto",
    "proto/tessera/v1/admin.proto",
];

/// Messages that carry card data, bank data, contact data or a CVC: they (and the oneofs
/// inside them, which the attribute reaches by path prefix) wipe their memory when dropped, and their `Debug` is written by hand (proto/redacted_debug.rs) to print none
/// of it.
const SECRET_MESSAGES: &[&str] = &[
    ".tessera.v1.Card",
    ".tessera.v1.BankAccount",
    ".tessera.v1.Contact",
    ".tessera.v1.DetokenizeResponse",
    ".tessera.vault.v1.Card",
    ".tessera.vault.v1.BankAccount",
    ".tessera.vault.v1.Contact",
    ".tessera.vault.v1.SecretData",
    ".tessera.vault.v1.ProtectItem",
    ".tessera.vault.v1.Revealed",
    // Master key shares of a sealed vault (Init's answer, Unseal's request).
    ".tessera.vault.v1.InitResponse",
    ".tessera.vault.v1.UnsealRequest",
];

/// Requests that carry such data only inside secret messages, apart from a CVC the gateway
/// moves into zeroizing memory as its first step: they print nothing, but stay plain structs
/// so callers can build them with `..Default::default()`.
const REDACTED_MESSAGES: &[&str] = &[".tessera.v1.TokenizeRequest"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("tessera_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&descriptors))?;

    // Without the `grpc` feature (the vault's core) only the messages are generated.
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    let mut builder = tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .build_transport(false)
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        // Their `Debug` is written by hand in proto/redacted_debug.rs and prints no card data.
        .skip_debug(SECRET_MESSAGES.iter().chain(REDACTED_MESSAGES).copied());
    for message in SECRET_MESSAGES {
        builder = builder.type_attribute(message, "#[derive(::zeroize::Zeroize, ::zeroize::ZeroizeOnDrop)]");
    }
    builder.compile_fds(descriptors)?;
    Ok(())
}
