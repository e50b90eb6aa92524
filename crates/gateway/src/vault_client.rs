//! The gateway's side of the vault hop: mutual TLS to every configured vault, calls spread
//! over those in rotation (crate::vault_pool), and concurrent Protect and Reveal calls
//! coalesced into batched requests (crate::vault_batcher).

use std::sync::Arc;
use std::time::Duration;

use tessera_api::error_details::decode_error_info;
use tessera_api::vault::vault_client::VaultClient as GeneratedClient;
use tessera_api::vault::{
    protect_result, reencrypt_result, reveal_result, rewrap_result, CreateKeysRequest, EchoRequest,
    ItemError, ProtectItem, ProtectRequest, Protected, ReencryptItem, ReencryptRequest, Reencrypted,
    RevealItem, RevealRequest, Revealed, RewrapKeysRequest, WrappedKey,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::config::VaultConnection;
use crate::error::ApiError;
use crate::vault_batcher::{Batcher, Failed, Limits, Operation};
use crate::vault_pool::{CallFailure, Pool, VaultReason};

/// A handle on the vaults; cheap to clone.
#[derive(Debug, Clone)]
pub struct VaultClient {
    pool: Arc<Pool>,
    protects: Batcher<ProtectOp>,
    reveals: Batcher<RevealOp>,
}

/// Protect as a batched operation.
#[derive(Debug)]
struct ProtectOp;

impl Operation for ProtectOp {
    type Item = ProtectItem;
    type Output = Protected;

    async fn call(
        mut client: GeneratedClient<Channel>,
        keys: Vec<WrappedKey>,
        items: Vec<ProtectItem>,
    ) -> Result<Vec<Result<Protected, ApiError>>, Status> {
        let response = client.protect(ProtectRequest { keys, items }).await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|result| match result.result {
                Some(protect_result::Result::Protected(protected)) => Ok(protected),
                Some(protect_result::Result::Error(error)) => Err(item_error(error)),
                None => Err(no_result()),
            })
            .collect())
    }

    fn call_error(status: &Status) -> ApiError {
        vault_call_error(status)
    }
}

/// Reveal as a batched operation.
#[derive(Debug)]
struct RevealOp;

impl Operation for RevealOp {
    type Item = RevealItem;
    type Output = Revealed;

    async fn call(
        mut client: GeneratedClient<Channel>,
        keys: Vec<WrappedKey>,
        items: Vec<RevealItem>,
    ) -> Result<Vec<Result<Revealed, ApiError>>, Status> {
        let response = client.reveal(RevealRequest { keys, items }).await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|result| match result.result {
                Some(reveal_result::Result::Revealed(revealed)) => Ok(revealed),
                Some(reveal_result::Result::Error(error)) => Err(item_error(error)),
                None => Err(no_result()),
            })
            .collect())
    }

    fn call_error(status: &Status) -> ApiError {
        vault_call_error(status)
    }
}

fn no_result() -> ApiError {
    ApiError::internal("VAULT_ERROR", "the vault returned no result")
}

impl VaultClient {
    /// Prepares one connection per configured vault. Connections are made lazily, so the
    /// gateway starts (and answers UNAVAILABLE) while a vault is down.
    pub fn connect(config: &VaultConnection) -> Result<Self, String> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&config.ca)?))
            .identity(Identity::from_pem(
                read(&config.client_cert)?,
                read(&config.client_key)?,
            ))
            .domain_name(config.server_name.clone());
        let channels = config
            .endpoints
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .and_then(|endpoint| endpoint.tls_config(tls.clone()))
                    .map(|endpoint| {
                        let channel = endpoint
                            .connect_timeout(Duration::from_secs(2))
                            .timeout(Duration::from_secs(10))
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(20))
                            .connect_lazy();
                        (url.clone(), channel)
                    })
                    .map_err(|err| format!("bad vault endpoint {url}: {err}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with_channels(channels, Limits::default()))
    }

    /// A client over ready-made channels, one per endpoint URL.
    pub(crate) fn with_channels(channels: Vec<(String, Channel)>, limits: Limits) -> Self {
        let pool = Arc::new(Pool::new(channels));
        Self {
            protects: Batcher::new(Arc::clone(&pool), limits),
            reveals: Batcher::new(Arc::clone(&pool), limits),
            pool,
        }
    }

    fn url(&self, endpoint: usize) -> String {
        self.pool
            .endpoint(endpoint)
            .map(|endpoint| endpoint.url().to_string())
            .unwrap_or_default()
    }

    /// Creates a merchant's first data and fingerprint keys, returned wrapped. Not batched (it
    /// happens once per merchant); retried on another vault when one cannot be reached, which
    /// is safe because nothing is stored before the gateway has the answer.
    pub async fn create_keys(
        &self,
        merchant_id: &str,
        version: u32,
    ) -> Result<(WrappedKey, WrappedKey), ApiError> {
        let request = CreateKeysRequest {
            merchant_id: merchant_id.to_owned(),
            data_key_version: version,
            fingerprint_key_version: version,
        };
        let response = self
            .unary_with_failover(|mut client| {
                let request = request.clone();
                async move { client.create_keys(request).await }
            })
            .await?;
        match (response.data_key, response.fingerprint_key) {
            (Some(data), Some(fingerprint)) => Ok((data, fingerprint)),
            _ => Err(ApiError::internal("VAULT_ERROR", "the vault returned no keys")),
        }
    }

    /// Protects one item, batched with concurrent calls. Returns the URL of the vault that
    /// protected it too: a CVC it now holds lives only in that vault's memory.
    pub async fn protect(
        &self,
        keys: Vec<WrappedKey>,
        item: ProtectItem,
    ) -> Result<(Protected, String), ApiError> {
        let served = self
            .protects
            .one(keys, item, None)
            .await
            .map_err(Failed::into_error)?;
        Ok((served.value, self.url(served.endpoint)))
    }

    /// Protects many items; each item succeeds or fails on its own. They are sent in batches
    /// alongside concurrent calls (after interactive ones, with a guaranteed share of each
    /// batch). The whole call fails when any item could not reach a vault (or a vault refused
    /// its request as a whole), so the caller can retry it as one.
    pub async fn protect_batch(
        &self,
        keys: Vec<WrappedKey>,
        items: Vec<ProtectItem>,
    ) -> Result<Vec<Result<Protected, ApiError>>, ApiError> {
        self.protects
            .many(keys, items)
            .await
            .into_iter()
            .map(|reply| match reply {
                Ok(served) => Ok(Ok(served.value)),
                Err(Failed::Item(error)) => Ok(Err(error)),
                Err(Failed::Call(error)) => Err(error),
            })
            .collect()
    }

    /// Sends `payload` to the vault's no-op `Echo` and returns what came back: the vault hop
    /// of the benchmark floor (crate::floor). Deliberately naive: one request per call, round
    /// robin over the vaults, no batching and no retry, because the floor measures a plain
    /// relay. The status is passed on as it is because the floor measures the hop, not the
    /// gateway's error mapping.
    pub async fn echo(&self, payload: Vec<u8>) -> Result<Vec<u8>, Status> {
        let endpoint = self
            .pool
            .route()
            .await
            .ok()
            .and_then(|index| self.pool.endpoint(index))
            .ok_or_else(|| Status::unavailable("no vault is in rotation"))?;
        let response = endpoint.client().echo(EchoRequest { payload }).await?;
        Ok(response.into_inner().payload)
    }

    /// Reveals one record's data (and the CVC it asks for), batched with concurrent calls, on
    /// any vault.
    pub async fn reveal(&self, keys: Vec<WrappedKey>, item: RevealItem) -> Result<Revealed, ApiError> {
        self.reveal_on("", keys, item).await
    }

    /// Reveals one record on the vault `cvc_vault` (the URL [`Self::protect`] returned for the
    /// token holding the CVC) while that vault is in rotation, because only it holds the CVC.
    /// Otherwise, or for an empty or unknown URL, any vault reveals the data and the CVC is
    /// reported unavailable.
    pub async fn reveal_on(
        &self,
        cvc_vault: &str,
        keys: Vec<WrappedKey>,
        item: RevealItem,
    ) -> Result<Revealed, ApiError> {
        let pin = if cvc_vault.is_empty() {
            None
        } else {
            self.pool.index_of(cvc_vault)
        };
        self.reveals
            .one(keys, item, pin)
            .await
            .map(|served| served.value)
            .map_err(Failed::into_error)
    }
}

/// Key rotation's vault calls (crate::reencrypt, crate::admin). Not batched with public
/// traffic: they already carry many items each.
impl VaultClient {
    /// Creates a merchant's data key `version` alone (key rotation), returned wrapped.
    pub async fn create_data_key(&self, merchant_id: &str, version: u32) -> Result<WrappedKey, ApiError> {
        let request = CreateKeysRequest {
            merchant_id: merchant_id.to_owned(),
            data_key_version: version,
            fingerprint_key_version: 0,
        };
        let response = self
            .unary_with_failover(|mut client| {
                let request = request.clone();
                async move { client.create_keys(request).await }
            })
            .await?;
        response
            .data_key
            .ok_or_else(|| ApiError::internal("VAULT_ERROR", "the vault returned no key"))
    }

    /// Re-encrypts records under a newer data key; each item succeeds or fails on its own.
    pub async fn reencrypt(
        &self,
        keys: Vec<WrappedKey>,
        items: Vec<ReencryptItem>,
    ) -> Result<Vec<Result<Reencrypted, ApiError>>, ApiError> {
        let request = ReencryptRequest { keys, items };
        let response = self
            .unary_with_failover(|mut client| {
                let request = request.clone();
                async move { client.reencrypt(request).await }
            })
            .await?;
        Ok(response
            .results
            .into_iter()
            .map(|result| match result.result {
                Some(reencrypt_result::Result::Reencrypted(reencrypted)) => Ok(reencrypted),
                Some(reencrypt_result::Result::Error(error)) => Err(item_error(error)),
                None => Err(no_result()),
            })
            .collect())
    }

    /// Re-wraps keys with the vault's current master key (KEK rotation). Returns the results
    /// in request order and the check value of the master key that now wraps them.
    pub async fn rewrap_keys(
        &self,
        keys: Vec<WrappedKey>,
    ) -> Result<(Vec<Result<WrappedKey, ApiError>>, String), ApiError> {
        let request = RewrapKeysRequest { keys };
        let response = self
            .unary_with_failover(|mut client| {
                let request = request.clone();
                async move { client.rewrap_keys(request).await }
            })
            .await?;
        let results = response
            .results
            .into_iter()
            .map(|result| match result.result {
                Some(rewrap_result::Result::Key(key)) => Ok(key),
                Some(rewrap_result::Result::Error(error)) => Err(item_error(error)),
                None => Err(no_result()),
            })
            .collect();
        Ok((results, response.master_key_check_value))
    }

    /// One unary call on a vault in rotation, tried on the next one when a vault cannot be
    /// reached: safe for calls whose answer is stored only after it arrives (key creation,
    /// re-encryption, re-wrapping).
    async fn unary_with_failover<T, F, Fut>(&self, call: F) -> Result<T, ApiError>
    where
        F: Fn(GeneratedClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut attempts = 0;
        loop {
            let index = self.pool.route().await?;
            let Some(endpoint) = self.pool.endpoint(index) else {
                return Err(self.pool.down_error());
            };
            attempts += 1;
            match call(endpoint.client()).await {
                Ok(response) => {
                    self.pool.mark_ok(index);
                    return Ok(response.into_inner());
                }
                Err(status) => match CallFailure::of(&status) {
                    CallFailure::Transport => {
                        self.pool.mark_down(index, false);
                        if attempts >= self.pool.len() {
                            return Err(vault_call_error(&status));
                        }
                    }
                    CallFailure::Refused { sealed } => {
                        self.pool.mark_down(index, sealed);
                        return Err(vault_call_error(&status));
                    }
                    CallFailure::Answered => return Err(vault_call_error(&status)),
                },
            }
        }
    }
}

/// Maps a per-item vault error to the public error it stands for.
fn item_error(error: ItemError) -> ApiError {
    let code = Code::from_i32(error.code);
    let code = if code == Code::Ok { Code::Internal } else { code };
    let mut api = ApiError::new(code, error.reason, error.message);
    api.field = match error.field.as_str() {
        "card.number" => Some("card.number"),
        "card.expiry_month" => Some("card.expiry_month"),
        "card.expiry_year" => Some("card.expiry_year"),
        "card.holder_name" => Some("card.holder_name"),
        "card" => Some("card"),
        "cvc" => Some("cvc"),
        "cvc_token" => Some("cvc_token"),
        "bank_account.iban" => Some("bank_account.iban"),
        "bank_account.bic" => Some("bank_account.bic"),
        "bank_account.holder_name" => Some("bank_account.holder_name"),
        "contact" => Some("contact"),
        "data" => Some("data"),
        _ => None,
    };
    api
}

/// Maps a failed vault call to the public error: callers see that the vault is unavailable,
/// never the vault's internals.
fn vault_call_error(status: &Status) -> ApiError {
    let reason = decode_error_info(status.details()).map(|info| info.reason);
    tracing::warn!(code = ?status.code(), reason = ?reason, "vault call failed");
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            let reason = if reason.as_deref().map(VaultReason::parse) == Some(VaultReason::Sealed) {
                "VAULT_SEALED"
            } else {
                "VAULT_UNAVAILABLE"
            };
            ApiError::unavailable(reason, "the vault is unavailable; retry later")
        }
        _ => ApiError::internal("VAULT_ERROR", "the vault refused the request"),
    }
}

#[cfg(test)]
mod tests {
    //! The client against small in-process fakes of the vault's gRPC service (plaintext, on
    //! 127.0.0.1:0): enough to count requests and items, delay answers and fail on cue. The
    //! end-to-end tests (tests/e2e_vault_failover.rs) use the real vault binary.
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tessera_api::error_details::encode_status_details;
    use tessera_api::vault::vault_server::{Vault, VaultServer};
    use tessera_api::vault::{
        secret_data, Card, CreateKeysResponse, EchoResponse, InitRequest, InitResponse, KeyPurpose,
        ProtectResponse, ProtectResult, RevealResponse, RevealResult, SealRequest, SealResponse, SecretData,
        StatusRequest, StatusResponse, UnsealRequest, UnsealResponse,
    };
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response};

    use super::*;

    /// What a fake vault saw and how it behaves.
    #[derive(Debug, Default)]
    struct FakeState {
        name: String,
        /// Items of each Protect/Reveal request, in arrival order.
        requests: Mutex<Vec<usize>>,
        /// Keys of each Protect/Reveal request.
        keys: Mutex<Vec<usize>>,
        echoes: AtomicUsize,
        /// How long each Protect/Reveal takes.
        delay: Duration,
        /// Answer like a lost connection (no ErrorInfo).
        broken: AtomicBool,
        /// Answer VAULT_SEALED.
        sealed: AtomicBool,
    }

    #[derive(Debug, Clone)]
    struct FakeVault(Arc<FakeState>);

    impl FakeVault {
        fn refusal(&self) -> Option<Status> {
            if self.0.broken.load(Ordering::SeqCst) {
                return Some(Status::unavailable("connection reset"));
            }
            if self.0.sealed.load(Ordering::SeqCst) {
                let details = encode_status_details(14, "sealed", "VAULT_SEALED", &[]);
                return Some(Status::with_details(Code::Unavailable, "sealed", details.into()));
            }
            None
        }

        async fn arrive(&self, keys: usize, items: usize) -> Result<(), Status> {
            if let Some(status) = self.refusal() {
                return Err(status);
            }
            self.0.requests.lock().unwrap().push(items);
            self.0.keys.lock().unwrap().push(keys);
            tokio::time::sleep(self.0.delay).await;
            Ok(())
        }
    }

    fn card_number(item: &ProtectItem) -> String {
        match item.data.as_ref().and_then(|data| data.data.as_ref()) {
            Some(secret_data::Data::Card(card)) => card.number.clone(),
            _ => String::new(),
        }
    }

    #[tonic::async_trait]
    impl Vault for FakeVault {
        async fn create_keys(
            &self,
            request: Request<CreateKeysRequest>,
        ) -> Result<Response<CreateKeysResponse>, Status> {
            if let Some(status) = self.refusal() {
                return Err(status);
            }
            let merchant_id = request.into_inner().merchant_id;
            let key = |purpose: KeyPurpose| WrappedKey {
                merchant_id: merchant_id.clone(),
                purpose: purpose as i32,
                version: 1,
                blob: self.0.name.clone().into_bytes(),
            };
            Ok(Response::new(CreateKeysResponse {
                data_key: Some(key(KeyPurpose::Data)),
                fingerprint_key: Some(key(KeyPurpose::Fingerprint)),
            }))
        }

        /// Tokens are `tok_<vault>_<card number>`, so a test sees which vault answered whom;
        /// merchant `bad` is refused per item.
        async fn protect(
            &self,
            request: Request<ProtectRequest>,
        ) -> Result<Response<ProtectResponse>, Status> {
            let request = request.into_inner();
            self.arrive(request.keys.len(), request.items.len()).await?;
            let results = request
                .items
                .iter()
                .map(|item| {
                    let result = if item.merchant_id == "bad" {
                        protect_result::Result::Error(ItemError {
                            code: Code::InvalidArgument as i32,
                            reason: "INVALID_CARD_NUMBER".into(),
                            message: "card number fails the Luhn check".into(),
                            field: "card.number".into(),
                        })
                    } else {
                        protect_result::Result::Protected(Protected {
                            token: format!("tok_{}_{}", self.0.name, card_number(item)),
                            holds_cvc: !item.cvc.is_empty(),
                            ..Protected::default()
                        })
                    };
                    ProtectResult { result: Some(result) }
                })
                .collect();
            Ok(Response::new(ProtectResponse { results }))
        }

        /// Answers with the vault's name as the CVC when one is asked for.
        async fn reveal(&self, request: Request<RevealRequest>) -> Result<Response<RevealResponse>, Status> {
            let request = request.into_inner();
            self.arrive(request.keys.len(), request.items.len()).await?;
            let results = request
                .items
                .iter()
                .map(|item| RevealResult {
                    result: Some(reveal_result::Result::Revealed(Revealed {
                        data: None,
                        cvc: if item.cvc_token.is_empty() {
                            String::new()
                        } else {
                            self.0.name.clone()
                        },
                    })),
                })
                .collect();
            Ok(Response::new(RevealResponse { results }))
        }

        async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
            if let Some(status) = self.refusal() {
                return Err(status);
            }
            self.0.echoes.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(EchoResponse {
                payload: request.into_inner().payload,
            }))
        }

        async fn init(&self, _: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn unseal(&self, _: Request<UnsealRequest>) -> Result<Response<UnsealResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn seal(&self, _: Request<SealRequest>) -> Result<Response<SealResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn reencrypt(
            &self,
            _: Request<tessera_api::vault::ReencryptRequest>,
        ) -> Result<Response<tessera_api::vault::ReencryptResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn rewrap_keys(
            &self,
            _: Request<tessera_api::vault::RewrapKeysRequest>,
        ) -> Result<Response<tessera_api::vault::RewrapKeysResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn rekey(
            &self,
            _: Request<tessera_api::vault::RekeyRequest>,
        ) -> Result<Response<tessera_api::vault::RekeyResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn retire_master_keys(
            &self,
            _: Request<tessera_api::vault::RetireMasterKeysRequest>,
        ) -> Result<Response<tessera_api::vault::RetireMasterKeysResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    /// Starts a fake vault named `name` answering after `delay`.
    async fn fake(name: &str, delay: Duration) -> (Arc<FakeState>, String) {
        let state = Arc::new(FakeState {
            name: name.to_owned(),
            delay,
            ..FakeState::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = VaultServer::new(FakeVault(Arc::clone(&state)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (state, format!("http://{addr}"))
    }

    /// A URL nothing listens on.
    async fn dead_url() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}")
    }

    fn client(urls: &[&str], limits: Limits) -> VaultClient {
        let channels = urls
            .iter()
            .map(|url| {
                let channel = Endpoint::from_shared(url.to_string())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy();
                (url.to_string(), channel)
            })
            .collect();
        VaultClient::with_channels(channels, limits)
    }

    fn keys(merchant: &str) -> Vec<WrappedKey> {
        [KeyPurpose::Data, KeyPurpose::Fingerprint]
            .into_iter()
            .map(|purpose| WrappedKey {
                merchant_id: merchant.into(),
                purpose: purpose as i32,
                version: 1,
                blob: vec![1, 2, 3],
            })
            .collect()
    }

    fn item(merchant: &str, number: &str) -> ProtectItem {
        ProtectItem {
            merchant_id: merchant.into(),
            data: Some(SecretData {
                data: Some(secret_data::Data::Card(Card {
                    number: number.into(),
                    expiry_month: 12,
                    expiry_year: 2031,
                    holder_name: String::new(),
                })),
            }),
            format: 0,
            cvc: String::new(),
        }
    }

    fn reveal_item(cvc_token: &str) -> RevealItem {
        RevealItem {
            merchant_id: "m1".into(),
            token: "tok_x".into(),
            data_key_version: 1,
            ciphertext: vec![1],
            cvc_token: cvc_token.into(),
            ..RevealItem::default()
        }
    }

    fn one_in_flight() -> Limits {
        Limits {
            max_in_flight: 1,
            ..Limits::default()
        }
    }

    /// Runs `count` protects at once, merchant `merchant_of(i)` and card number `n<i>`.
    async fn protect_all(
        client: &VaultClient,
        count: usize,
        merchant_of: impl Fn(usize) -> &'static str,
    ) -> Vec<Result<(Protected, String), ApiError>> {
        let calls: Vec<_> = (0..count)
            .map(|i| {
                let client = client.clone();
                let merchant = merchant_of(i);
                tokio::spawn(async move {
                    client
                        .protect(keys(merchant), item(merchant, &format!("n{i}")))
                        .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap());
        }
        results
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_call_is_sent_at_once_on_its_own() {
        let (vault, url) = fake("a", Duration::ZERO).await;
        let client = client(&[&url], Limits::default());
        let started = std::time::Instant::now();
        let (protected, served_by) = client.protect(keys("m1"), item("m1", "n0")).await.unwrap();
        assert_eq!(protected.token, "tok_a_n0");
        assert_eq!(served_by, url);
        assert_eq!(*vault.requests.lock().unwrap(), vec![1]);
        // No timer holds a lone call back (the first call also pays for the connection).
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
        for _ in 0..5 {
            client.protect(keys("m1"), item("m1", "n1")).await.unwrap();
        }
        assert_eq!(*vault.requests.lock().unwrap(), vec![1; 6]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_requests_and_each_gets_its_own_answer() {
        let (vault, url) = fake("a", Duration::from_millis(50)).await;
        let client = client(&[&url], one_in_flight());
        let merchants = ["m1", "m2"];
        let results = protect_all(&client, 64, |i| merchants[i % 2]).await;
        for (i, result) in results.into_iter().enumerate() {
            let (protected, served_by) = result.unwrap();
            assert_eq!(protected.token, format!("tok_a_n{i}"));
            assert_eq!(served_by, url);
        }
        let requests = vault.requests.lock().unwrap().clone();
        assert_eq!(requests.iter().sum::<usize>(), 64);
        assert!(
            requests.len() < 64 / 4,
            "64 calls took {} requests: {requests:?}",
            requests.len()
        );
        // Keys are sent once per merchant, purpose and version, however many items use them.
        let keys_sent = vault.keys.lock().unwrap().clone();
        for (items, keys) in requests.iter().zip(&keys_sent) {
            assert!(
                *keys <= 4 && (*items == 1 || *keys == 4),
                "{items} items with {keys} keys"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_are_capped() {
        let (vault, url) = fake("a", Duration::from_millis(50)).await;
        let limits = Limits {
            max_items: 8,
            max_in_flight: 1,
            ..Limits::default()
        };
        let client = client(&[&url], limits);
        let results = protect_all(&client, 40, |_| "m1").await;
        assert!(results.iter().all(Result::is_ok));
        let requests = vault.requests.lock().unwrap().clone();
        assert!(requests.iter().all(|items| *items <= 8), "{requests:?}");
        assert_eq!(requests.iter().sum::<usize>(), 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_item_fails_only_itself() {
        let (vault, url) = fake("a", Duration::from_millis(50)).await;
        let client = client(&[&url], one_in_flight());
        let results = protect_all(&client, 16, |i| if i == 7 { "bad" } else { "m1" }).await;
        for (i, result) in results.into_iter().enumerate() {
            if i == 7 {
                let error = result.unwrap_err();
                assert_eq!(error.code, Code::InvalidArgument);
                assert_eq!(error.reason, "INVALID_CARD_NUMBER");
                assert_eq!(error.field, Some("card.number"));
            } else {
                assert_eq!(result.unwrap().0.token, format!("tok_a_n{i}"));
            }
        }
        assert!(vault.requests.lock().unwrap().len() < 16);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_items_come_back_in_order_with_their_own_errors() {
        let (vault, url) = fake("a", Duration::ZERO).await;
        let client = client(&[&url], Limits::default());
        let items: Vec<_> = (0..600)
            .map(|i| item(if i % 100 == 3 { "bad" } else { "m1" }, &format!("n{i}")))
            .collect();
        let results = client.protect_batch(keys("m1"), items).await.unwrap();
        assert_eq!(results.len(), 600);
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(protected) => assert_eq!(protected.token, format!("tok_a_n{i}")),
                Err(error) => {
                    assert_eq!(i % 100, 3);
                    assert_eq!(error.reason, "INVALID_CARD_NUMBER");
                }
            }
        }
        let requests = vault.requests.lock().unwrap().clone();
        assert!(
            requests.iter().all(|items| *items <= MAX_BATCH_ITEMS_FOR_TEST),
            "{requests:?}"
        );
        assert_eq!(requests.iter().sum::<usize>(), 600);
    }

    const MAX_BATCH_ITEMS_FOR_TEST: usize = crate::vault_batcher::MAX_BATCH_ITEMS;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_spread_over_vaults() {
        let (a, url_a) = fake("a", Duration::from_millis(20)).await;
        let (b, url_b) = fake("b", Duration::from_millis(20)).await;
        let client = client(&[&url_a, &url_b], one_in_flight());
        for _ in 0..3 {
            let results = protect_all(&client, 20, |_| "m1").await;
            assert!(results.iter().all(Result::is_ok));
        }
        assert!(!a.requests.lock().unwrap().is_empty());
        assert!(!b.requests.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_vault_is_left_and_its_calls_retried_on_another() {
        let (a, url_a) = fake("a", Duration::from_millis(20)).await;
        let (_b, url_b) = fake("b", Duration::from_millis(20)).await;
        a.broken.store(true, Ordering::SeqCst);
        let client = client(&[&url_a, &url_b], one_in_flight());
        for _ in 0..3 {
            for result in protect_all(&client, 20, |_| "m1").await {
                let (protected, served_by) = result.unwrap();
                assert!(protected.token.starts_with("tok_b_"));
                assert_eq!(served_by, url_b);
            }
        }
        assert!(a.requests.lock().unwrap().is_empty());
        assert!(!client.pool.is_up(0));
        // The watcher's probe puts it back once it works again (after the 1 s backoff).
        a.broken.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(client.pool.is_up(0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_vault_is_left_and_its_calls_retried_on_another() {
        let dead = dead_url().await;
        let (_b, url_b) = fake("b", Duration::ZERO).await;
        let client = client(&[&dead, &url_b], Limits::default());
        for result in protect_all(&client, 20, |_| "m1").await {
            assert_eq!(result.unwrap().1, url_b);
        }
        let (first, second) = client.create_keys("m9", 1).await.unwrap();
        assert_eq!(first.blob, b"b");
        assert_eq!(second.merchant_id, "m9");
        assert!(!client.pool.is_up(0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_vault_reachable_is_unavailable_and_fails_a_bulk_call_whole() {
        let client = client(&[&dead_url().await, &dead_url().await], Limits::default());
        let error = client.protect(keys("m1"), item("m1", "n0")).await.unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_ref()),
            (Code::Unavailable, "VAULT_UNAVAILABLE")
        );
        let items = (0..10).map(|i| item("m1", &format!("n{i}"))).collect();
        let error = client.protect_batch(keys("m1"), items).await.unwrap_err();
        assert_eq!(error.reason, "VAULT_UNAVAILABLE");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vault_coming_back_is_used_at_once_when_it_is_the_only_one() {
        let (a, url) = fake("a", Duration::ZERO).await;
        let client = client(&[&url], Limits::default());
        a.broken.store(true, Ordering::SeqCst);
        assert!(client.protect(keys("m1"), item("m1", "n0")).await.is_err());
        assert!(!client.pool.is_up(0));
        a.broken.store(false, Ordering::SeqCst);
        // Well within the 1 s backoff: the call itself probes when no vault is in rotation.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.protect(keys("m1"), item("m1", "n1")).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sealed_answer_is_not_retried_and_all_sealed_reads_sealed() {
        let (a, url_a) = fake("a", Duration::ZERO).await;
        let (b, url_b) = fake("b", Duration::ZERO).await;
        a.sealed.store(true, Ordering::SeqCst);
        b.sealed.store(true, Ordering::SeqCst);
        let client = client(&[&url_a, &url_b], Limits::default());
        let error = client.protect(keys("m1"), item("m1", "n0")).await.unwrap_err();
        assert_eq!(
            (error.code, error.reason.as_ref()),
            (Code::Unavailable, "VAULT_SEALED")
        );
        // One of them answered and was not asked again; the next call finds both sealed.
        let error = client.protect(keys("m1"), item("m1", "n0")).await.unwrap_err();
        assert_eq!(error.reason, "VAULT_SEALED");
        let error = client.protect(keys("m1"), item("m1", "n0")).await.unwrap_err();
        assert_eq!(error.reason, "VAULT_SEALED");
        // Unsealing one brings it back through a probe.
        b.sealed.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            client.protect(keys("m1"), item("m1", "n1")).await.unwrap().1,
            url_b
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reveal_for_a_cvc_goes_to_the_vault_that_holds_it() {
        let (_a, url_a) = fake("a", Duration::from_millis(5)).await;
        let (b, url_b) = fake("b", Duration::from_millis(5)).await;
        let client = client(&[&url_a, &url_b], Limits::default());
        for (url, name) in [(&url_a, "a"), (&url_b, "b")] {
            let calls: Vec<_> = (0..20)
                .map(|_| {
                    let client = client.clone();
                    let url = url.clone();
                    tokio::spawn(
                        async move { client.reveal_on(&url, keys("m1"), reveal_item("tok_c")).await },
                    )
                })
                .collect();
            for call in calls {
                assert_eq!(call.await.unwrap().unwrap().cvc, name);
            }
        }
        // With its vault out of rotation, the reveal goes to another.
        b.broken.store(true, Ordering::SeqCst);
        let revealed = client
            .reveal_on(&url_b, keys("m1"), reveal_item("tok_c"))
            .await
            .unwrap();
        assert_eq!(revealed.cvc, "a");
        let revealed = client
            .reveal_on(&url_b, keys("m1"), reveal_item("tok_c"))
            .await
            .unwrap();
        assert_eq!(revealed.cvc, "a");
        // Unknown or no vault: any.
        assert!(client
            .reveal_on("https://elsewhere:1", keys("m1"), reveal_item(""))
            .await
            .is_ok());
        assert!(client.reveal(keys("m1"), reveal_item("")).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn echo_is_never_batched() {
        let (a, url) = fake("a", Duration::ZERO).await;
        let client = client(&[&url], one_in_flight());
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.echo(vec![i]).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), vec![u8::try_from(i).unwrap()]);
        }
        assert_eq!(a.echoes.load(Ordering::SeqCst), 20);
        assert!(a.requests.lock().unwrap().is_empty());
    }
}
