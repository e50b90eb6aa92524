//! Costs of the vault's per-item work, so a change that slows tokenization shows up here.
//! Run with `cargo bench -p tessera-vault-core`; it finishes in well under a minute.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use tessera_vault_core::card::{year_month_utc, Pan, ValidCard};
use tessera_vault_core::crypto::Random;
use tessera_vault_core::keys::{DataKey, FingerprintKey, KeyCache, KeyId, KeyPurpose, MasterKey, SecretKey};
use tessera_vault_core::record::{open_card, seal_card, NonceSequence, RecordAad};
use tessera_vault_core::token::TokenRandom;

/// Items per random draw in the batched tokenize benchmark, like a coalesced gateway batch.
const BATCH: u64 = 64;

struct Fixture {
    rng: Random,
    master: MasterKey,
    cache: KeyCache,
    data_id: KeyId,
    data_blob: Vec<u8>,
    fingerprint_id: KeyId,
    fingerprint_blob: Vec<u8>,
    nonces: NonceSequence,
    card: tessera_api::vault::Card,
    today: (u32, u32),
}

impl Fixture {
    fn new() -> Fixture {
        let rng = Random::system();
        let master = MasterKey::new(SecretKey::generate(&rng).unwrap());
        let data_id = KeyId {
            merchant_id: "merchant-1".into(),
            purpose: KeyPurpose::Data,
            version: 1,
        };
        let fingerprint_id = KeyId {
            purpose: KeyPurpose::Fingerprint,
            ..data_id.clone()
        };
        let data_blob = master.create_key(&data_id, &rng).unwrap();
        let fingerprint_blob = master.create_key(&fingerprint_id, &rng).unwrap();
        let nonces = NonceSequence::new(&rng).unwrap();
        let today = year_month_utc(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs());
        let card = tessera_api::vault::Card {
            number: "4111 1111 1111 1111".into(),
            expiry_month: 12,
            expiry_year: today.0 + 3,
            holder_name: "Ada Lovelace".into(),
        };
        Fixture {
            rng,
            master,
            cache: KeyCache::new(1024),
            data_id,
            data_blob,
            fingerprint_id,
            fingerprint_blob,
            nonces,
            card,
            today,
        }
    }

    fn data_key(&self) -> std::sync::Arc<DataKey> {
        self.cache
            .data_key(&self.master, &self.data_id, &self.data_blob)
            .unwrap()
    }

    fn fingerprint_key(&self) -> std::sync::Arc<FingerprintKey> {
        self.cache
            .fingerprint_key(&self.master, &self.fingerprint_id, &self.fingerprint_blob)
            .unwrap()
    }

    /// What Protect does for one card once the batch's keys are in hand.
    fn tokenize_item(
        &self,
        random: &mut TokenRandom,
        data: &DataKey,
        fingerprints: &FingerprintKey,
    ) -> usize {
        let card = ValidCard::from_proto(&self.card, self.today).unwrap();
        let facts = card.facts();
        let token = random.next_opaque().unwrap();
        let fingerprint = fingerprints.fingerprint(&card.pan);
        let aad = RecordAad {
            merchant_id: &self.data_id.merchant_id,
            token: &token,
            key_version: 1,
        };
        let sealed = seal_card(data, &self.nonces, &aad, &card).unwrap();
        black_box((&facts, &fingerprint));
        sealed.len()
    }
}

fn benches(c: &mut Criterion) {
    let f = Fixture::new();
    let data = f.data_key();
    let fingerprints = f.fingerprint_key();
    let card = ValidCard::from_proto(&f.card, f.today).unwrap();
    let aad = RecordAad {
        merchant_id: "merchant-1",
        token: "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        key_version: 1,
    };
    let sealed = seal_card(&data, &f.nonces, &aad, &card).unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();

    c.bench_function("key_cache_hit", |b| b.iter(|| f.data_key()));
    c.bench_function("key_unwrap", |b| {
        b.iter(|| f.master.unwrap(&f.data_id, black_box(&f.data_blob)).unwrap())
    });
    c.bench_function("seal_card", |b| {
        b.iter(|| seal_card(&data, &f.nonces, &aad, black_box(&card)).unwrap())
    });
    c.bench_function("open_card", |b| {
        b.iter(|| open_card(&data, &aad, black_box(&sealed)).unwrap())
    });
    c.bench_function("fingerprint", |b| {
        b.iter(|| fingerprints.fingerprint(black_box(&pan)))
    });
    c.bench_function("parse_pan", |b| {
        b.iter(|| Pan::parse(black_box("4111 1111 1111 1111")).unwrap())
    });
    c.bench_function("opaque_token", |b| {
        b.iter(|| TokenRandom::for_batch(&f.rng, 1).unwrap().next_opaque().unwrap())
    });
    c.bench_function("format_preserving_token", |b| {
        b.iter(|| {
            TokenRandom::for_batch(&f.rng, 1)
                .unwrap()
                .next_format_preserving(black_box(&pan))
                .unwrap()
        })
    });
    // One random draw per item: the cost of a batch of one.
    c.bench_function("tokenize_item/alone", |b| {
        b.iter(|| {
            let mut random = TokenRandom::for_batch(&f.rng, 1).unwrap();
            f.tokenize_item(&mut random, &data, &fingerprints)
        })
    });
    // Per-item cost inside a batch of 64, sharing one random draw.
    c.bench_function("tokenize_item/in_batch_of_64", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut done = 0;
            while done < iters {
                let items = (iters - done).min(BATCH);
                let mut random = TokenRandom::for_batch(&f.rng, items as usize).unwrap();
                for _ in 0..items {
                    black_box(f.tokenize_item(&mut random, &data, &fingerprints));
                }
                done += items;
            }
            start.elapsed()
        })
    });
}

criterion_group! {
    name = vault_crypto;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = benches
}
criterion_main!(vault_crypto);
