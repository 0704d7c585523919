//! The `ec2` provisioner: on-demand agents on EC2 (or an EC2-compatible
//! cloud), through a small client of the EC2 Query API: form-encoded POSTs
//! signed with SigV4 (`aws-sigv4`), sent with reqwest (rustls with ring, a
//! timeout on every call), answers read with `roxmltree`.
//!
//! Every instance is tagged `trunkfarm:hub` (this hub), `trunkfarm:pool`,
//! `trunkfarm:instance` and `Name`: that is how [`Provisioner::list`] finds
//! what this hub started, so a restarted hub terminates what it forgot. Its
//! user data is a template (default: the embedded `config/cloud-init/agent.sh`)
//! with the instance's single-use enrollment string filled in; that string,
//! the secret key and the request signature are never logged nor put in an
//! error message.
//!
//! Credentials: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and
//! `AWS_SESSION_TOKEN`) from the hub's environment, else a profile of the
//! shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, default
//! `~/.aws/credentials`; `AWS_PROFILE`, default `default`), re-read before
//! every call so rotated keys are picked up.

use std::collections::BTreeMap;
use std::fmt;

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::{Instance, Provisioner, StartSpec};
use crate::aws_credentials::{AwsCredentials, Credentials};
use crate::config::{Ec2Section, PoolConfig};

/// The EC2 API version every request names.
pub(crate) const API_VERSION: &str = "2016-11-15";
/// How long one EC2 call may take, answer included.
pub(crate) const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default user-data template.
pub(crate) const DEFAULT_TEMPLATE: &str = include_str!("../../../config/cloud-init/agent.sh");
/// EC2's limit on user data (before base64).
pub(crate) const MAX_USER_DATA: usize = 16 * 1024;
/// The largest answer read from the endpoint.
const MAX_ANSWER: usize = 8 << 20;
/// Pages of `DescribeInstances` read at most.
const MAX_PAGES: usize = 100;

/// The tag naming the hub that started an instance.
pub(crate) const TAG_HUB: &str = "trunkfarm:hub";
/// The tag naming its pool.
pub(crate) const TAG_POOL: &str = "trunkfarm:pool";
/// The tag naming the instance (as the hub knows it).
pub(crate) const TAG_INSTANCE: &str = "trunkfarm:instance";

/// The template's placeholders, without braces.
pub(crate) const PLACEHOLDERS: [&str; 6] = [
    "ENROLLMENT",
    "AGENT_URL",
    "POOL",
    "INSTANCE",
    "LABELS",
    "MAX_PARALLEL_JOBS",
];

/// Instance states [`Provisioner::list`] reports (anything not terminated).
const LISTED_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

// ---------------------------------------------------------------------------
// The user-data template
// ---------------------------------------------------------------------------

/// The `{{NAME}}` placeholders in `template` that are not ours.
pub(crate) fn unknown_placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let name = &after[..end];
        let looks_like_ours =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        if looks_like_ours && !PLACEHOLDERS.contains(&name) && !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
        rest = &after[end + 2..];
    }
    out
}

/// What the placeholders stand for, for one instance.
pub(crate) struct TemplateValues<'a> {
    /// The single-use enrollment string (a secret).
    pub(crate) enrollment: &'a str,
    /// `pool.ec2.agent_url`.
    pub(crate) agent_url: &'a str,
    /// The pool's name.
    pub(crate) pool: &'a str,
    /// The instance's name.
    pub(crate) instance: &'a str,
    /// The pool's labels and `pool-<name>`.
    pub(crate) labels: &'a [String],
    /// `pool.max_parallel_jobs`.
    pub(crate) max_parallel_jobs: u32,
}

/// Fills the placeholders in.
pub(crate) fn render(template: &str, v: &TemplateValues<'_>) -> String {
    template
        .replace("{{AGENT_URL}}", v.agent_url)
        .replace("{{POOL}}", v.pool)
        .replace("{{INSTANCE}}", v.instance)
        .replace("{{LABELS}}", &v.labels.join(","))
        .replace("{{MAX_PARALLEL_JOBS}}", &v.max_parallel_jobs.to_string())
        // Last: nothing after it can touch the secret.
        .replace("{{ENROLLMENT}}", v.enrollment)
}

/// The labels an instance's agent carries: the pool's and `pool-<name>`.
pub(crate) fn instance_labels(pool: &PoolConfig) -> Vec<String> {
    let mut labels = pool.labels.clone();
    labels.push(format!("pool-{}", pool.name));
    labels
}

// ---------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

fn children<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> + 'a {
    node.children()
        .filter(move |n| n.is_element() && n.tag_name().name() == name)
}

fn text_of(node: Option<roxmltree::Node<'_, '_>>) -> String {
    node.and_then(|n| n.text())
        .map(|t| t.trim().to_owned())
        .unwrap_or_default()
}

/// EC2's error answer (`<Response><Errors><Error><Code/><Message/>`, or
/// `<ErrorResponse><Error>…` from other Query APIs): the first error's code
/// and message.
pub(crate) fn parse_error(xml: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let err = doc.descendants().find(|n| {
        n.is_element() && n.tag_name().name() == "Error" && child(*n, "Code").is_some()
    })?;
    let code = text_of(child(err, "Code"));
    let message = text_of(child(err, "Message"));
    (!code.is_empty()).then_some((code, message))
}

/// The instance id in a `RunInstancesResponse`.
pub(crate) fn parse_run_instances(xml: &str) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML ({e})"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "RunInstancesResponse" {
        return Err(format!(
            "expected a RunInstancesResponse, got <{}>",
            root.tag_name().name()
        ));
    }
    let id = child(root, "instancesSet")
        .and_then(|set| children(set, "item").next())
        .map(|item| text_of(child(item, "instanceId")))
        .unwrap_or_default();
    if id.is_empty() {
        return Err("the answer names no instance".into());
    }
    Ok(id)
}

/// One instance as `DescribeInstances` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Described {
    /// `i-…`.
    pub(crate) id: String,
    /// `pending`, `running`, `terminated`…
    pub(crate) state: String,
    /// Its tags.
    pub(crate) tags: BTreeMap<String, String>,
}

/// The instances in one page of a `DescribeInstancesResponse`, and the token
/// of the next page.
pub(crate) fn parse_describe_instances(
    xml: &str,
) -> Result<(Vec<Described>, Option<String>), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML ({e})"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "DescribeInstancesResponse" {
        return Err(format!(
            "expected a DescribeInstancesResponse, got <{}>",
            root.tag_name().name()
        ));
    }
    let mut out = Vec::new();
    if let Some(reservations) = child(root, "reservationSet") {
        for reservation in children(reservations, "item") {
            let Some(set) = child(reservation, "instancesSet") else {
                continue;
            };
            for item in children(set, "item") {
                let id = text_of(child(item, "instanceId"));
                if id.is_empty() {
                    return Err("an instance without instanceId".into());
                }
                let state = text_of(child(item, "instanceState").and_then(|s| child(s, "name")));
                let mut tags = BTreeMap::new();
                if let Some(set) = child(item, "tagSet") {
                    for tag in children(set, "item") {
                        tags.insert(text_of(child(tag, "key")), text_of(child(tag, "value")));
                    }
                }
                out.push(Described { id, state, tags });
            }
        }
    }
    let next = Some(text_of(child(root, "nextToken"))).filter(|t| !t.is_empty());
    Ok((out, next))
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why an EC2 call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ApiError {
    /// EC2 answered with an error.
    Refused {
        /// The action.
        action: String,
        /// EC2's code, e.g. `InvalidAMIID.NotFound`.
        code: String,
        /// EC2's message.
        message: String,
    },
    /// An HTTP error without an EC2 error in it.
    Http {
        /// The action.
        action: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer.
        snippet: String,
    },
    /// No answer (the request may or may not have reached EC2).
    Unreachable {
        /// The action.
        action: String,
        /// What went wrong.
        detail: String,
    },
    /// The request could not be made (nothing was sent).
    Local {
        /// The action.
        action: String,
        /// What went wrong.
        detail: String,
    },
    /// An answer that could not be read.
    Unreadable {
        /// The action.
        action: String,
        /// What went wrong.
        detail: String,
    },
}

/// What to check for an EC2 error code.
pub(crate) fn hint(code: &str, action: &str) -> Option<String> {
    let creds = "check the hub's AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, \
                 or the profile in ~/.aws/credentials)";
    let h = match code {
        c if c.starts_with("InvalidAMIID") => {
            "check pool.ec2.ami: images are per region, is it in pool.ec2.region?".into()
        }
        c if c.starts_with("InvalidSubnet") => "check pool.ec2.subnet_id".into(),
        c if c.starts_with("InvalidGroup") || c.starts_with("InvalidSecurityGroup") => {
            "check pool.ec2.security_group_ids (they must be in the subnet's VPC)".into()
        }
        c if c.starts_with("InvalidKeyPair") => "check pool.ec2.key_name".into(),
        "InvalidInstanceType" | "Unsupported" => {
            "check pool.ec2.instance_type (is it offered in this region and zone?)".into()
        }
        "InvalidUserData.Malformed" => "check pool.ec2.user_data_template".into(),
        "AuthFailure"
        | "SignatureDoesNotMatch"
        | "InvalidClientTokenId"
        | "MissingAuthenticationToken"
        | "IncompleteSignature"
        | "UnrecognizedClientException"
        | "InvalidAccessKeyId"
        | "InvalidSecurity"
        | "OptInRequired" => creds.into(),
        "ExpiredToken" | "RequestExpired" => format!(
            "{creds}; temporary credentials expire, and the hub's clock must be right"
        ),
        "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => format!(
            "the credentials work but may not call ec2:{action}: allow it in their IAM policy"
        ),
        "InsufficientInstanceCapacity" | "InsufficientHostCapacity" => {
            "EC2 has no capacity for this instance type here right now; the pool backs off and retries"
                .into()
        }
        "InstanceLimitExceeded" | "VcpuLimitExceeded" | "MaxSpotInstanceCountExceeded" => {
            "the account's EC2 quota is used up: raise it, or lower pool.max_instances".into()
        }
        "RequestLimitExceeded" | "Throttling" => {
            "EC2 is throttling this account; the pool backs off and retries".into()
        }
        "InternalError" | "Unavailable" | "ServiceUnavailable" => {
            "a problem on EC2's side; the pool backs off and retries".into()
        }
        _ => return None,
    };
    Some(h)
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Refused {
                action,
                code,
                message,
            } => {
                write!(f, "EC2 refused {action}: {code}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                if let Some(h) = hint(code, action) {
                    write!(f, " ({h})")?;
                }
                Ok(())
            }
            ApiError::Http {
                action,
                status,
                snippet,
            } => {
                write!(f, "EC2 answered {action} with HTTP {status}")?;
                if matches!(status, 401 | 403) {
                    write!(
                        f,
                        " (check the hub's AWS credentials and pool.ec2.endpoint)"
                    )?;
                }
                if !snippet.is_empty() {
                    write!(f, ": {snippet}")?;
                }
                Ok(())
            }
            ApiError::Unreachable { action, detail } => {
                write!(f, "no answer from EC2 to {action}: {detail}")
            }
            ApiError::Local { action, detail } => {
                write!(f, "cannot call EC2's {action}: {detail}")
            }
            ApiError::Unreadable { action, detail } => {
                write!(f, "cannot read EC2's answer to {action}: {detail}")
            }
        }
    }
}

/// `text` with every occurrence of each secret replaced.
fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if s.len() >= 8 {
            out = out.replace(s, "<redacted>");
        }
    }
    out
}

/// The first `n` characters of an answer, on one line.
fn snippet(body: &str, n: usize) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let t = one_line.trim();
    match t.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// The Query API client
// ---------------------------------------------------------------------------

/// Percent-encodes as AWS wants it (RFC 3986: only `A-Za-z0-9-_.~` stay).
pub(crate) fn aws_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `Action=…&Version=…&<params>` as a form body.
pub(crate) fn form_body(action: &str, params: &[(String, String)]) -> String {
    let mut parts = vec![
        format!("Action={}", aws_encode(action)),
        format!("Version={API_VERSION}"),
    ];
    parts.extend(
        params
            .iter()
            .map(|(k, v)| format!("{}={}", aws_encode(k), aws_encode(v))),
    );
    parts.join("&")
}

const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// The SigV4 headers (`authorization`, `x-amz-date`, maybe
/// `x-amz-security-token`) for a POST of `body` to `url`.
pub(crate) fn sign(
    url: &str,
    body: &str,
    region: &str,
    creds: &AwsCredentials,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings};
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.clone(),
        creds.secret_access_key.clone(),
        creds.session_token.clone(),
        None,
        "trunkfarm",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("ec2")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into();
    // The body's hash, not the body: it carries the enrollment string and
    // the signer's trace logging must never see it.
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let signable = SignableRequest::new(
        "POST",
        url,
        [("content-type", CONTENT_TYPE)].into_iter(),
        SignableBody::Precomputed(hash),
    )
    .map_err(|e| format!("cannot sign the request: {e}"))?;
    let (instructions, _signature) = aws_sigv4::http_request::sign(signable, &params)
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

struct Api {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    region: String,
    creds: Credentials,
}

impl Api {
    /// One call; the answer's text on success.
    async fn call(&self, action: &str, params: &[(String, String)]) -> Result<String, ApiError> {
        let body = form_body(action, params);
        let creds = self.creds.current();
        let signed = sign(
            self.endpoint.as_str(),
            &body,
            &self.region,
            &creds,
            SystemTime::now(),
        )
        .map_err(|detail| ApiError::Local {
            action: action.into(),
            detail,
        })?;
        let mut req = self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body);
        for (k, v) in signed {
            let mut value =
                reqwest::header::HeaderValue::from_str(&v).map_err(|_| ApiError::Local {
                    action: action.into(),
                    detail: format!("the signature header {k} is not a valid header value"),
                })?;
            value.set_sensitive(true);
            req = req.header(k, value);
        }
        tracing::debug!(action, endpoint = %self.endpoint, "EC2 call");
        let unreachable = |e: reqwest::Error| ApiError::Unreachable {
            action: action.into(),
            detail: if e.is_timeout() {
                format!(
                    "no answer from {} within {}s",
                    self.endpoint,
                    HTTP_TIMEOUT.as_secs()
                )
            } else if e.is_connect() {
                format!(
                    "cannot connect to {} (check pool.ec2.endpoint / pool.ec2.region): {}",
                    self.endpoint,
                    error_chain(&e)
                )
            } else {
                format!("{}: {}", self.endpoint, error_chain(&e))
            },
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if bytes.len() > MAX_ANSWER {
            return Err(ApiError::Unreadable {
                action: action.into(),
                detail: format!("the answer is larger than {MAX_ANSWER} bytes"),
            });
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some((code, message)) = parse_error(&text) {
            return Err(ApiError::Refused {
                action: action.into(),
                code,
                message,
            });
        }
        if !status.is_success() {
            return Err(ApiError::Http {
                action: action.into(),
                status: status.as_u16(),
                snippet: snippet(&text, 200),
            });
        }
        Ok(text)
    }
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        src = s.source();
    }
    out
}

// ---------------------------------------------------------------------------
// The provisioner
// ---------------------------------------------------------------------------

/// Instances of one pool on EC2.
pub(crate) struct Ec2 {
    pool: String,
    settings: Ec2Section,
    hub_tag: String,
    template: String,
    api: Api,
}

/// Whether a URL can be put in the default template (in single quotes,
/// then double-quoted): no quotes, spaces, `$`, backslashes or backticks.
fn url_safe(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-:/+=@,%?&#~;!*()[]".contains(c))
}

/// Whether a label can be put in the default template unquoted (a shell
/// word and a systemd `ExecStart` argument).
fn label_safe(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-:/+=@".contains(c))
}

impl Ec2 {
    /// The provisioner of `pool` (which has a `[pool.ec2]` table), tagging
    /// its instances with `hub_tag`. Credentials come from the environment
    /// or the shared credentials file; none is an error.
    pub(crate) fn new(pool: PoolConfig, hub_tag: String) -> anyhow::Result<Ec2> {
        let creds = Credentials::load()
            .map_err(|e| anyhow::anyhow!("pool {:?} (provisioner = \"ec2\"): {e}", pool.name))?;
        Ec2::with_credentials(pool, hub_tag, creds)
    }

    /// Like [`Ec2::new`] with the credentials given.
    pub(crate) fn with_credentials(
        pool: PoolConfig,
        hub_tag: String,
        creds: Credentials,
    ) -> anyhow::Result<Ec2> {
        let name = pool.name.clone();
        let fail = |msg: String| anyhow::anyhow!("pool {name:?} (provisioner = \"ec2\"): {msg}");
        let Some(settings) = pool.ec2.clone() else {
            return Err(fail("there is no [pool.ec2] table".into()));
        };
        let endpoint = settings
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://ec2.{}.amazonaws.com", settings.region.trim()));
        let endpoint = reqwest::Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| {
                fail(format!(
                    "pool.ec2.endpoint {endpoint:?} is not an http(s) URL"
                ))
            })?;
        let template = match &settings.user_data_template {
            None => DEFAULT_TEMPLATE.to_owned(),
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                fail(format!(
                    "cannot read pool.ec2.user_data_template {}: {e}",
                    path.display()
                ))
            })?,
        };
        let unknown = unknown_placeholders(&template);
        if !unknown.is_empty() {
            return Err(fail(format!(
                "the user-data template has unknown placeholders: {}; known: {}",
                unknown
                    .iter()
                    .map(|u| format!("{{{{{u}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                PLACEHOLDERS
                    .iter()
                    .map(|u| format!("{{{{{u}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !template.contains("{{ENROLLMENT}}") {
            return Err(fail(
                "the user-data template has no {{ENROLLMENT}}: its agent could never enroll".into(),
            ));
        }
        if template.len() > MAX_USER_DATA - 1024 {
            return Err(fail(format!(
                "the user-data template is {} bytes; EC2 takes at most {MAX_USER_DATA} bytes of user data",
                template.len()
            )));
        }
        if template.contains("{{AGENT_URL}}") {
            let url = settings.agent_url.trim();
            if url.is_empty() {
                return Err(fail(
                    "pool.ec2.agent_url is empty, but the user-data template downloads trunkfarm-agent from it: \
                     set it to an http(s) URL of a trunkfarm-agent binary built for the image"
                        .into(),
                ));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) || !url_safe(url) {
                return Err(fail(format!(
                    "pool.ec2.agent_url {url:?} must be an http(s) URL without quotes, spaces or shell characters"
                )));
            }
        }
        for label in &pool.labels {
            if !label_safe(label) {
                return Err(fail(format!(
                    "label {label:?} cannot be passed to the agent in user data: use letters, digits and . _ - : / + = @"
                )));
            }
        }
        for (k, v) in &settings.tags {
            let reserved = k.starts_with("trunkfarm:") || k == "Name";
            if k.trim().is_empty() || k.len() > 128 || v.len() > 256 {
                return Err(fail(format!(
                    "pool.ec2.tags: {k:?} is not a valid EC2 tag (keys 1 to 128 characters, values at most 256)"
                )));
            }
            if reserved || k.starts_with("aws:") {
                return Err(fail(format!(
                    "pool.ec2.tags: the tag {k:?} is set by {} and cannot be configured",
                    if reserved { "trunkfarm" } else { "AWS" }
                )));
            }
        }
        // reqwest is built without a crypto provider of its own: ring, the
        // one the whole hub uses (harmless if already installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("trunkfarm/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| fail(format!("cannot make an HTTP client: {e}")))?;
        Ok(Ec2 {
            pool: pool.name.clone(),
            api: Api {
                http,
                endpoint,
                region: settings.region.trim().to_owned(),
                creds,
            },
            settings,
            hub_tag,
            template,
        })
    }

    /// The `RunInstances` parameters (user data already base64).
    fn run_params(&self, spec: &StartSpec, user_data_b64: String) -> Vec<(String, String)> {
        let s = &self.settings;
        let mut p: Vec<(String, String)> = vec![
            ("ImageId".into(), s.ami.trim().to_owned()),
            ("InstanceType".into(), s.instance_type.trim().to_owned()),
            ("MinCount".into(), "1".into()),
            ("MaxCount".into(), "1".into()),
            ("UserData".into(), user_data_b64),
            // A stopped instance is of no use to anyone: terminate instead.
            (
                "InstanceInitiatedShutdownBehavior".into(),
                "terminate".into(),
            ),
        ];
        if let Some(subnet) = s.subnet_id.as_deref().filter(|v| !v.trim().is_empty()) {
            p.push(("SubnetId".into(), subnet.trim().to_owned()));
        }
        for (i, sg) in s.security_group_ids.iter().enumerate() {
            p.push((format!("SecurityGroupId.{}", i + 1), sg.trim().to_owned()));
        }
        if let Some(key) = s.key_name.as_deref().filter(|v| !v.trim().is_empty()) {
            p.push(("KeyName".into(), key.trim().to_owned()));
        }
        let mut tags: Vec<(String, String)> = vec![
            (TAG_HUB.into(), self.hub_tag.clone()),
            (TAG_POOL.into(), self.pool.clone()),
            (TAG_INSTANCE.into(), spec.instance.clone()),
            ("Name".into(), spec.instance.clone()),
        ];
        tags.extend(s.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        p.push(("TagSpecification.1.ResourceType".into(), "instance".into()));
        for (i, (k, v)) in tags.into_iter().enumerate() {
            p.push((format!("TagSpecification.1.Tag.{}.Key", i + 1), k));
            p.push((format!("TagSpecification.1.Tag.{}.Value", i + 1), v));
        }
        p
    }

    /// Instances tagged for this hub and pool (and `extra` tags), in the
    /// given states (all pages).
    async fn describe(
        &self,
        extra: &[(&str, &str)],
        states: &[&str],
    ) -> Result<Vec<Described>, ApiError> {
        let mut want: Vec<(String, String)> = vec![
            (TAG_HUB.into(), self.hub_tag.clone()),
            (TAG_POOL.into(), self.pool.clone()),
        ];
        want.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut params: Vec<(String, String)> = Vec::new();
        let mut n = 0;
        for (k, v) in &want {
            n += 1;
            params.push((format!("Filter.{n}.Name"), format!("tag:{k}")));
            params.push((format!("Filter.{n}.Value.1"), v.clone()));
        }
        if !states.is_empty() {
            n += 1;
            params.push((format!("Filter.{n}.Name"), "instance-state-name".into()));
            for (i, st) in states.iter().enumerate() {
                params.push((format!("Filter.{n}.Value.{}", i + 1), (*st).to_owned()));
            }
        }
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut page_params = params.clone();
            if let Some(t) = &token {
                page_params.push(("NextToken".into(), t.clone()));
            }
            let text = self.api.call("DescribeInstances", &page_params).await?;
            let (page, next) =
                parse_describe_instances(&text).map_err(|detail| ApiError::Unreadable {
                    action: "DescribeInstances".into(),
                    detail,
                })?;
            // Checked here too: a cloud that ignored a filter must not make
            // this hub terminate what is not its own.
            out.extend(page.into_iter().filter(|d| {
                want.iter()
                    .all(|(k, v)| d.tags.get(k).is_some_and(|t| t == v))
                    && (states.is_empty() || states.contains(&d.state.as_str()))
            }));
            match next {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn terminate(&self, id: &str) -> Result<(), ApiError> {
        let params = vec![("InstanceId.1".to_owned(), id.to_owned())];
        match self.api.call("TerminateInstances", &params).await {
            Ok(_) => Ok(()),
            // Already gone (or never could exist): nothing to stop.
            Err(ApiError::Refused { code, .. })
                if code == "InvalidInstanceID.NotFound"
                    || code == "InvalidInstanceID.Malformed" =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// After a `RunInstances` whose answer was lost: terminates whatever it
    /// may have started for this instance name. Says what it did.
    async fn clean_up_lost_start(&self, instance: &str) -> String {
        match self
            .describe(&[(TAG_INSTANCE, instance)], &LISTED_STATES)
            .await
        {
            Ok(found) if found.is_empty() => String::new(),
            Ok(found) => {
                let mut failed = Vec::new();
                for d in &found {
                    if let Err(e) = self.terminate(&d.id).await {
                        failed.push(format!("{}: {e}", d.id));
                    }
                }
                if failed.is_empty() {
                    format!(
                        "; terminated what it had started anyway ({})",
                        found
                            .iter()
                            .map(|d| d.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!(
                        "; it had started an instance anyway, which could not be terminated ({}): the hub terminates it at its next start",
                        failed.join("; ")
                    )
                }
            }
            Err(e) => format!(
                "; could not check whether it started an instance anyway ({e}): the hub terminates any at its next start"
            ),
        }
    }
}

#[tonic::async_trait]
impl Provisioner for Ec2 {
    async fn start(&self, spec: &StartSpec) -> Result<String, String> {
        let labels = instance_labels(&spec.pool);
        let user_data = render(
            &self.template,
            &TemplateValues {
                enrollment: &spec.enrollment,
                agent_url: self.settings.agent_url.trim(),
                pool: &self.pool,
                instance: &spec.instance,
                labels: &labels,
                max_parallel_jobs: spec.pool.max_parallel_jobs,
            },
        );
        if user_data.len() > MAX_USER_DATA {
            return Err(format!(
                "the user data is {} bytes, more than EC2's {MAX_USER_DATA} (shorten pool.ec2.user_data_template)",
                user_data.len()
            ));
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(user_data.as_bytes());
        let params = self.run_params(spec, b64.clone());
        let secrets = [spec.enrollment.as_str(), b64.as_str()];
        match self.api.call("RunInstances", &params).await {
            Ok(text) => match parse_run_instances(&text) {
                Ok(id) => Ok(id),
                Err(detail) => {
                    let e = ApiError::Unreadable {
                        action: "RunInstances".into(),
                        detail,
                    };
                    let cleanup = self.clean_up_lost_start(&spec.instance).await;
                    Err(scrub(&format!("{e}{cleanup}"), &secrets))
                }
            },
            // Nothing was started.
            Err(e @ (ApiError::Refused { .. } | ApiError::Local { .. })) => {
                Err(scrub(&e.to_string(), &secrets))
            }
            Err(e) => {
                // The request may have reached EC2 and started an instance
                // whose id never came back.
                let cleanup = self.clean_up_lost_start(&spec.instance).await;
                Err(scrub(&format!("{e}{cleanup}"), &secrets))
            }
        }
    }

    async fn stop(&self, instance: &Instance) -> Result<(), String> {
        if instance.handle.is_empty() {
            // Its start never returned an id (the hub stopped meanwhile):
            // whatever carries its name goes.
            let found = self
                .describe(&[(TAG_INSTANCE, &instance.id)], &LISTED_STATES)
                .await
                .map_err(|e| e.to_string())?;
            for d in found {
                self.terminate(&d.id).await.map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        self.terminate(&instance.handle)
            .await
            .map_err(|e| e.to_string())
    }

    async fn list(&self, pool: &str) -> Option<Vec<String>> {
        if pool != self.pool {
            return Some(Vec::new());
        }
        match self.describe(&[], &LISTED_STATES).await {
            Ok(found) => Some(found.into_iter().map(|d| d.id).collect()),
            Err(e) => {
                tracing::warn!(pool = %self.pool, "cannot list the pool's EC2 instances: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn pool(template: Option<PathBuf>) -> PoolConfig {
        let toml = r#"
name = "cloud"
provisioner = "ec2"
labels = ["linux", "big"]
max_parallel_jobs = 3
[ec2]
region = "eu-west-1"
ami = "ami-0abc"
instance_type = "c6i.large"
subnet_id = "subnet-1"
security_group_ids = ["sg-1", "sg-2"]
key_name = "debug"
agent_url = "https://example.org/trunkfarm-agent"
tags = { team = "ci" }
"#;
        let mut p: PoolConfig = toml::from_str(toml).unwrap();
        p.ec2.as_mut().unwrap().user_data_template = template;
        p
    }

    fn creds() -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn ec2(p: PoolConfig) -> anyhow::Result<Ec2> {
        Ec2::with_credentials(
            p,
            "farm-1".into(),
            Credentials::new(creds(), crate::aws_credentials::CredentialSource::Env),
        )
    }

    fn spec(p: &PoolConfig) -> StartSpec {
        StartSpec {
            instance: "cloud-7".into(),
            pool: p.clone(),
            enrollment: "tf1_SECRETSECRETSECRET".into(),
        }
    }

    #[test]
    fn the_default_template_renders_every_placeholder() {
        let p = pool(None);
        let labels = instance_labels(&p);
        let out = render(
            DEFAULT_TEMPLATE,
            &TemplateValues {
                enrollment: "tf1_abc-_DEF",
                agent_url: "https://example.org/a",
                pool: "cloud",
                instance: "cloud-7",
                labels: &labels,
                max_parallel_jobs: 3,
            },
        );
        assert!(out.starts_with("#!/bin/sh\n"));
        assert!(!out.contains("{{"), "{out}");
        assert!(out.contains("AGENT_URL='https://example.org/a'"));
        assert!(out.contains("LABELS='linux,big,pool-cloud'"));
        assert!(out.contains("JOBS='3'"));
        assert!(out.contains("NAME='cloud-7'"));
        // In the environment of `enroll`, never on its command line.
        assert!(out.contains("ENROLLMENT='tf1_abc-_DEF'"));
        assert!(out.contains("TRUNKFARM_ENROLLMENT=$ENROLLMENT \"$BIN\" enroll --name"));
        assert_eq!(out.matches("tf1_abc-_DEF").count(), 1);
        assert!(unknown_placeholders(DEFAULT_TEMPLATE).is_empty());
        assert!(DEFAULT_TEMPLATE.len() < MAX_USER_DATA - 1024);
    }

    #[test]
    fn the_rendered_default_template_is_valid_shell() {
        let labels = vec!["a:b".to_string(), "pool-x".to_string()];
        let out = render(
            DEFAULT_TEMPLATE,
            &TemplateValues {
                enrollment: "tf1_eyJoIjoiMTI3LjAuMC4xOjEifQ",
                agent_url: "https://example.org/dl?v=1&arch=x86_64#frag",
                pool: "x",
                instance: "x-1",
                labels: &labels,
                max_parallel_jobs: 1,
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user-data.sh");
        std::fs::write(&path, out).unwrap();
        let status = std::process::Command::new("sh")
            .arg("-n")
            .arg(&path)
            .status()
            .expect("run sh -n");
        assert!(status.success(), "sh -n refused the rendered template");
    }

    #[test]
    fn render_replaces_repeated_placeholders_and_leaves_other_braces() {
        let labels = vec!["a".to_string()];
        let out = render(
            "{{POOL}} {{POOL}} ${X} {{ lower }} {{MAX_PARALLEL_JOBS}}",
            &TemplateValues {
                enrollment: "",
                agent_url: "",
                pool: "p",
                instance: "i",
                labels: &labels,
                max_parallel_jobs: 2,
            },
        );
        assert_eq!(out, "p p ${X} {{ lower }} 2");
        assert_eq!(
            unknown_placeholders("{{POOL}} {{NOPE}} {{NOPE}} {{lower}} {{ENROLLMENT}}"),
            vec!["NOPE".to_string()]
        );
    }

    #[test]
    fn a_custom_template_is_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        std::fs::write(
            &path,
            "#cloud-config\nruncmd: [echo {{ENROLLMENT}} {{TYPO}}]\n",
        )
        .unwrap();
        let e = ec2(pool(Some(path.clone()))).err().unwrap().to_string();
        assert!(
            e.contains("{{TYPO}}") && e.contains("unknown placeholder"),
            "{e}"
        );
        std::fs::write(&path, "#cloud-config\nruncmd: [echo hi]\n").unwrap();
        let e = ec2(pool(Some(path.clone()))).err().unwrap().to_string();
        assert!(e.contains("no {{ENROLLMENT}}"), "{e}");
        // Without {{AGENT_URL}}, no agent_url is needed.
        std::fs::write(&path, "#cloud-config\nruncmd: [x {{ENROLLMENT}}]\n").unwrap();
        let mut p = pool(Some(path.clone()));
        p.ec2.as_mut().unwrap().agent_url = String::new();
        assert!(ec2(p).is_ok());
        let e = ec2(pool(Some(dir.path().join("missing"))))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read pool.ec2.user_data_template"), "{e}");
    }

    #[test]
    fn settings_the_default_template_cannot_use_are_refused() {
        let mut p = pool(None);
        p.ec2.as_mut().unwrap().agent_url = String::new();
        let e = ec2(p).err().unwrap().to_string();
        assert!(e.contains("pool.ec2.agent_url is empty"), "{e}");
        let mut p = pool(None);
        p.ec2.as_mut().unwrap().agent_url = "https://x/a'; rm -rf /".into();
        let e = ec2(p).err().unwrap().to_string();
        assert!(e.contains("without quotes"), "{e}");
        for label in ["it's", "#x", "a&b", "%i", "$(id)"] {
            let mut p = pool(None);
            p.labels.push(label.into());
            assert!(ec2(p).is_err(), "{label}");
        }
        for key in ["trunkfarm:hub", "Name", "aws:x"] {
            let mut p = pool(None);
            p.ec2.as_mut().unwrap().tags.insert(key.into(), "v".into());
            let e = ec2(p).err().unwrap().to_string();
            assert!(e.contains("cannot be configured"), "{key}: {e}");
        }
        let mut p = pool(None);
        p.ec2.as_mut().unwrap().endpoint = Some("ftp://x".into());
        assert!(ec2(p).is_err());
    }

    #[test]
    fn run_instances_parameters_carry_everything_and_the_tags() {
        let p = pool(None);
        let e = ec2(p.clone()).unwrap();
        assert_eq!(
            e.api.endpoint.as_str(),
            "https://ec2.eu-west-1.amazonaws.com/"
        );
        let params = e.run_params(&spec(&p), "VVNFUkRBVEE=".into());
        let get = |k: &str| {
            params
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("ImageId"), Some("ami-0abc"));
        assert_eq!(get("InstanceType"), Some("c6i.large"));
        assert_eq!(get("MinCount"), Some("1"));
        assert_eq!(get("MaxCount"), Some("1"));
        assert_eq!(get("SubnetId"), Some("subnet-1"));
        assert_eq!(get("SecurityGroupId.1"), Some("sg-1"));
        assert_eq!(get("SecurityGroupId.2"), Some("sg-2"));
        assert_eq!(get("KeyName"), Some("debug"));
        assert_eq!(get("UserData"), Some("VVNFUkRBVEE="));
        assert_eq!(get("TagSpecification.1.ResourceType"), Some("instance"));
        let mut tags = BTreeMap::new();
        for i in 1.. {
            let Some(k) = get(&format!("TagSpecification.1.Tag.{i}.Key")) else {
                break;
            };
            let v = get(&format!("TagSpecification.1.Tag.{i}.Value")).unwrap();
            tags.insert(k.to_string(), v.to_string());
        }
        let want: BTreeMap<String, String> = [
            ("trunkfarm:hub", "farm-1"),
            ("trunkfarm:pool", "cloud"),
            ("trunkfarm:instance", "cloud-7"),
            ("Name", "cloud-7"),
            ("team", "ci"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(tags, want);
    }

    #[test]
    fn the_form_body_is_percent_encoded_the_aws_way() {
        assert_eq!(aws_encode("a+b/c=d e~_.-"), "a%2Bb%2Fc%3Dd%20e~_.-");
        let body = form_body(
            "RunInstances",
            &[(
                "TagSpecification.1.Tag.1.Key".into(),
                "trunkfarm:hub".into(),
            )],
        );
        assert_eq!(
            body,
            "Action=RunInstances&Version=2016-11-15&TagSpecification.1.Tag.1.Key=trunkfarm%3Ahub"
        );
    }

    #[test]
    fn requests_are_signed_with_sigv4_and_the_secret_stays_out() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut c = creds();
        let h = sign(
            "https://ec2.eu-west-1.amazonaws.com/",
            "Action=X",
            "eu-west-1",
            &c,
            t,
        )
        .unwrap();
        let get = |h: &[(String, String)], k: &str| {
            h.iter()
                .find(|(hk, _)| hk == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let auth = get(&h, "authorization");
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/eu-west-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="
            ),
            "{auth}"
        );
        assert_eq!(get(&h, "x-amz-date"), "20231114T221320Z");
        assert!(!format!("{h:?}").contains(&c.secret_access_key));
        // Deterministic, and the body is part of it.
        let again = sign(
            "https://ec2.eu-west-1.amazonaws.com/",
            "Action=X",
            "eu-west-1",
            &c,
            t,
        )
        .unwrap();
        assert_eq!(h, again);
        let other = sign(
            "https://ec2.eu-west-1.amazonaws.com/",
            "Action=Y",
            "eu-west-1",
            &c,
            t,
        )
        .unwrap();
        assert_ne!(get(&h, "authorization"), get(&other, "authorization"));
        c.session_token = Some("SESSIONTOKEN".into());
        let h = sign("http://127.0.0.1:5000/", "Action=X", "us-east-1", &c, t).unwrap();
        assert_eq!(get(&h, "x-amz-security-token"), "SESSIONTOKEN");
        assert!(format!("{c:?}").contains("<redacted>") && !format!("{c:?}").contains("SESSION"));
    }

    const RUN: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r-1</requestId><reservationId>r-0d1</reservationId><ownerId>1234</ownerId>
  <groupSet/>
  <instancesSet><item>
    <blockDeviceMapping><item><deviceName>/dev/sda1</deviceName></item></blockDeviceMapping>
    <networkInterfaceSet><item><networkInterfaceId>eni-1</networkInterfaceId></item></networkInterfaceSet>
    <instanceId>i-0123456789abcdef0</instanceId>
    <imageId>ami-0abc</imageId>
    <instanceState><code>0</code><name>pending</name></instanceState>
  </item></instancesSet>
</RunInstancesResponse>"#;

    #[test]
    fn run_instances_answers_give_the_instance_id() {
        assert_eq!(parse_run_instances(RUN).unwrap(), "i-0123456789abcdef0");
        assert!(parse_run_instances("<RunInstancesResponse/>").is_err());
        assert!(parse_run_instances("<Other/>").is_err());
        assert!(parse_run_instances("not xml").is_err());
    }

    const DESCRIBE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>x</requestId>
  <reservationSet>
    <item><reservationId>r-1</reservationId><groupSet><item><groupId>sg-1</groupId></item></groupSet>
      <instancesSet>
        <item><instanceId>i-1</instanceId><instanceState><code>16</code><name>running</name></instanceState>
          <groupSet><item><groupId>sg-1</groupId></item></groupSet>
          <tagSet><item><key>trunkfarm:hub</key><value>farm-1</value></item>
                  <item><key>trunkfarm:pool</key><value>cloud</value></item></tagSet></item>
        <item><instanceId>i-2</instanceId><instanceState><code>48</code><name>terminated</name></instanceState></item>
      </instancesSet>
    </item>
    <item><reservationId>r-2</reservationId>
      <instancesSet><item><instanceId>i-3</instanceId><instanceState><code>0</code><name>pending</name></instanceState><tagSet/></item></instancesSet>
    </item>
  </reservationSet>
  <nextToken>page-2</nextToken>
</DescribeInstancesResponse>"#;

    #[test]
    fn describe_instances_answers_give_ids_states_tags_and_the_next_page() {
        let (list, next) = parse_describe_instances(DESCRIBE).unwrap();
        assert_eq!(next.as_deref(), Some("page-2"));
        let ids: Vec<(&str, &str)> = list
            .iter()
            .map(|d| (d.id.as_str(), d.state.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("i-1", "running"),
                ("i-2", "terminated"),
                ("i-3", "pending")
            ]
        );
        assert_eq!(list[0].tags.get("trunkfarm:hub").unwrap(), "farm-1");
        assert!(list[2].tags.is_empty());
        let (empty, next) = parse_describe_instances(
            "<DescribeInstancesResponse><reservationSet/><nextToken/></DescribeInstancesResponse>",
        )
        .unwrap();
        assert!(empty.is_empty() && next.is_none());
        assert!(parse_describe_instances("<RunInstancesResponse/>").is_err());
    }

    #[test]
    fn error_answers_become_clear_messages() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>InvalidAMIID.NotFound</Code><Message>The image id '[ami-x]' does not exist</Message></Error></Errors><RequestID>abc</RequestID></Response>"#;
        let (code, message) = parse_error(xml).unwrap();
        let e = ApiError::Refused {
            action: "RunInstances".into(),
            code,
            message,
        };
        assert_eq!(
            e.to_string(),
            "EC2 refused RunInstances: InvalidAMIID.NotFound: The image id '[ami-x]' does not exist (check pool.ec2.ami: images are per region, is it in pool.ec2.region?)"
        );
        let xml = r#"<ErrorResponse xmlns="x"><Error><Type>Sender</Type><Code>AuthFailure</Code><Message>AWS was not able to validate the provided access credentials</Message></Error></ErrorResponse>"#;
        let (code, message) = parse_error(xml).unwrap();
        let e = ApiError::Refused {
            action: "DescribeInstances".into(),
            code,
            message,
        };
        assert!(
            e.to_string().contains("check the hub's AWS credentials"),
            "{e}"
        );
        let e = ApiError::Refused {
            action: "TerminateInstances".into(),
            code: "UnauthorizedOperation".into(),
            message: "You are not authorized to perform this operation.".into(),
        };
        assert!(e.to_string().contains("ec2:TerminateInstances"), "{e}");
        assert!(parse_error(RUN).is_none());
        assert!(parse_error("<html>Bad gateway</html>").is_none());
        let e = ApiError::Http {
            action: "RunInstances".into(),
            status: 403,
            snippet: snippet("<html>\nForbidden\n</html>", 200),
        };
        assert_eq!(
            e.to_string(),
            "EC2 answered RunInstances with HTTP 403 (check the hub's AWS credentials and pool.ec2.endpoint): <html> Forbidden </html>"
        );
        assert_eq!(snippet("abcdef", 3), "abc…");
    }

    #[test]
    fn secrets_are_scrubbed_from_messages() {
        let out = scrub(
            "bad user data tf1_SECRETSECRETSECRET and QUJDREVGR0g=",
            &["tf1_SECRETSECRETSECRET", "QUJDREVGR0g="],
        );
        assert_eq!(out, "bad user data <redacted> and <redacted>");
    }
}
