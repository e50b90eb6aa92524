//! The tonic adapter of `tessera.v1.Tokenization`: it takes a request's caller from its client
//! certificate, holds unary messages to their size limit, runs mutating requests under their
//! idempotency key (crate::idempotency), and turns a handler's [`ApiError`] into a status.
//! The handlers themselves are in crate::handlers, one module per flow.

use std::sync::Arc;

use tessera_api::identity::peer_identity;
use tessera_api::limits::MAX_REQUEST_BYTES;
use tessera_api::v1::tokenization_server::Tokenization;
use tessera_api::v1::{
    ConfirmTokenRequest, DeleteTokenRequest, DeleteTokenResponse, DetokenizeRequest, DetokenizeResponse,
    ExtendRetentionRequest, GetTokenHistoryRequest, GetTokenHistoryResponse, GetTokenRequest,
    ListTokensRequest, ListTokensResponse, ReportAuthorizationRequest, ReportAuthorizationResponse,
    SubscribeEventsRequest, Token, TokenizeRequest, TokenizeResponse,
};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::handlers;
use crate::idempotency::IdempotentRequest;
use crate::policy::Operation;
use crate::state::Gateway;
use crate::transport_errors::too_large;
use crate::validate;

/// The tonic service over a shared [`Gateway`].
#[derive(Debug, Clone)]
pub struct TokenizationService(pub Arc<Gateway>);

fn caller<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    peer_identity(certs.iter().map(|cert| cert.as_ref()))
}

/// A unary request's caller and message, once the message is within the unary size limit.
/// tonic's decoder holds the whole service to the import limit (the largest message any of
/// its methods takes), so the tighter limit of the other methods is checked here.
fn accept<T: prost::Message>(request: Request<T>) -> Result<(Option<String>, T), Status> {
    if request.get_ref().encoded_len() > MAX_REQUEST_BYTES {
        return Err(too_large(MAX_REQUEST_BYTES).into());
    }
    Ok((caller(&request), request.into_inner()))
}

impl TokenizationService {
    /// Runs `work` under the request's idempotency key, if it has one (see crate::idempotency).
    async fn idempotent<T, F>(
        &self,
        caller: Option<&str>,
        merchant_id: &str,
        key: &str,
        method: &str,
        hash: Vec<u8>,
        work: F,
    ) -> Result<T, ApiError>
    where
        T: prost::Message + Default,
        F: std::future::Future<Output = Result<T, ApiError>>,
    {
        if key.is_empty() {
            return work.await;
        }
        validate::merchant_id(merchant_id)?;
        let caller = caller.ok_or_else(|| {
            ApiError::unauthenticated(
                "CALLER_UNIDENTIFIED",
                "client certificate carries no URI identity",
            )
        })?;
        crate::idempotency::run(
            &self.0.store,
            (merchant_id, caller),
            key,
            method,
            hash,
            self.0.clock.now_ms(),
            work,
        )
        .await
    }

    /// Runs `handler` for a mutating request under its idempotency key, if it carries one.
    async fn idempotent_call<R, T, F, Fut>(
        &self,
        request: Request<R>,
        handler: F,
    ) -> Result<Response<T>, Status>
    where
        R: IdempotentRequest,
        T: prost::Message + Default,
        F: FnOnce(Option<String>, R) -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let (caller, mut request) = accept(request)?;
        let key = request.take_key();
        let hash = request.hash();
        let merchant_id = request.merchant_id().to_owned();
        let work = handler(caller.clone(), request);
        reply(
            self.idempotent(caller.as_deref(), &merchant_id, &key, R::METHOD, hash, work)
                .await,
        )
    }
}

fn reply<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|err| {
        tracing::debug!(code = ?err.code, reason = %err.reason, "request refused");
        Status::from(err)
    })
}

#[tonic::async_trait]
impl Tokenization for TokenizationService {
    type ImportTokensStream = handlers::import::ImportStream;
    type SubscribeEventsStream = handlers::events::EventStream;

    async fn report_authorization(
        &self,
        request: Request<ReportAuthorizationRequest>,
    ) -> Result<Response<ReportAuthorizationResponse>, Status> {
        self.idempotent_call(request, |caller, request| {
            self.0.report_authorization(caller, request)
        })
        .await
    }

    async fn subscribe_events(
        &self,
        request: Request<SubscribeEventsRequest>,
    ) -> Result<Response<Self::SubscribeEventsStream>, Status> {
        let (caller, request) = accept(request)?;
        let start = || -> Result<_, ApiError> {
            validate::merchant_id(&request.merchant_id)?;
            self.0
                .policy
                .authorize(caller.as_deref(), Operation::ReadMetadata, &request.merchant_id)?;
            handlers::events::subscribe(Arc::clone(&self.0), &request)
        };
        reply(start())
    }

    async fn import_tokens(
        &self,
        request: Request<tonic::Streaming<tessera_api::v1::ImportRequest>>,
    ) -> Result<Response<Self::ImportTokensStream>, Status> {
        let caller = caller(&request);
        Ok(Response::new(handlers::import::start(
            Arc::clone(&self.0),
            caller,
            request.into_inner(),
        )))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.idempotent_call(request, |caller, request| self.0.tokenize(caller, request))
            .await
    }

    async fn get_token(&self, request: Request<GetTokenRequest>) -> Result<Response<Token>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.get_token(caller, request).await)
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.detokenize(caller, request).await)
    }

    async fn delete_token(
        &self,
        request: Request<DeleteTokenRequest>,
    ) -> Result<Response<DeleteTokenResponse>, Status> {
        self.idempotent_call(request, |caller, request| self.0.delete_token(caller, request))
            .await
    }

    async fn confirm_token(&self, request: Request<ConfirmTokenRequest>) -> Result<Response<Token>, Status> {
        self.idempotent_call(request, |caller, request| self.0.confirm_token(caller, request))
            .await
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.list_tokens(caller, request).await)
    }

    async fn extend_retention(
        &self,
        request: Request<ExtendRetentionRequest>,
    ) -> Result<Response<Token>, Status> {
        self.idempotent_call(request, |caller, request| {
            self.0.extend_retention(caller, request)
        })
        .await
    }

    async fn get_token_history(
        &self,
        request: Request<GetTokenHistoryRequest>,
    ) -> Result<Response<GetTokenHistoryResponse>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.token_history(caller, request).await)
    }
}
