//! How a client on this machine (the CLI, the demo, the benchmarks) reaches
//! a running hub as its administrator: its address and CA fingerprint from
//! `<data_dir>/hub.json`, the admin token from the data dir (or the config's
//! `admin.token_file`).

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use trunkfarm_proto::dial::{self, DialOptions, HubTrust};
use trunkfarm_proto::v1::admin_service_client::AdminServiceClient;

use crate::config::HubConfig;
use crate::server::HubInfo;

/// Adds the admin token to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(trunkfarm_proto::AUTHORIZATION, self.0.clone());
        Ok(request)
    }
}

/// An authenticated admin client.
pub(crate) type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// The address a client on this machine dials for a hub bound to `address`.
fn dialable(address: &str) -> String {
    match address.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        _ => address.to_string(),
    }
}

/// Connects to the hub described by `cfg` as its administrator.
pub(crate) async fn connect(cfg: &HubConfig) -> anyhow::Result<AdminClient> {
    let info = HubInfo::read(cfg.data_dir())?;
    let token_path = cfg.admin_token_path();
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("cannot read the admin token {}", token_path.display()))?;
    let value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
        .parse()
        .context("the admin token file holds characters a token cannot have")?;
    let trust = if info.tls {
        HubTrust::PinnedCa {
            sha256: info.ca_sha256.clone(),
        }
    } else {
        HubTrust::Plaintext
    };
    let addr = dialable(&info.address);
    let channel = dial::connect(&addr, &trust, &DialOptions::default())
        .await
        .with_context(|| format!("cannot reach the hub at {addr}"))?;
    let max = usize::try_from(cfg.limits.max_message_size).unwrap_or(usize::MAX);
    Ok(AdminServiceClient::with_interceptor(channel, Bearer(value))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// Prints a gRPC error's message the way the hub phrased it.
pub(crate) fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}
