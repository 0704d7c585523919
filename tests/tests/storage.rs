//! `[storage] backend = "s3"` against a real S3 API (`moto_server`): a hub
//! whose bucket cannot be used refuses to start and says what to fix, and
//! the whole trunk story (green → red → fixed) runs with its artifacts and
//! logs in the bucket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use trunkfarm_e2e::moto::Moto;
use trunkfarm_e2e::{bins, combined, run_with_timeout, temp_dir};

/// A `[storage]` section for `bucket` on `endpoint`.
fn storage_toml(endpoint: &str, bucket: &str) -> String {
    format!(
        "\n[storage]\nbackend = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"hubs/e2e\"\nendpoint = \"{endpoint}\"\n"
    )
}

/// Runs `trunkfarm serve` with `storage`; it must exit (not serve) within
/// the timeout. Its combined output.
fn refused_start(dir: &Path, storage: &str, env: &[(&str, &str)]) -> String {
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n{storage}",
            dir.join("data").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&bins().hub);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
        .env_remove("AWS_PROFILE")
        .env("HOME", dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let text = combined(&out);
    assert!(!out.status.success(), "the hub started:\n{text}");
    assert!(
        !dir.join("data").join("hub.json").exists(),
        "the hub wrote hub.json before refusing:\n{text}"
    );
    text
}

const KEYS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "AKIDE2ESTORAGE"),
    ("AWS_SECRET_ACCESS_KEY", "e2e-storage-secret"),
];

#[test]
fn a_store_that_cannot_be_used_stops_the_start_and_says_what_to_fix() {
    let moto = Moto::start(&[]);
    moto.create_bucket("present");

    // The bucket does not exist.
    let dir = temp_dir("trunkfarm-e2e-storage-nobucket-");
    let text = refused_start(dir.path(), &storage_toml(&moto.endpoint(), "absent"), &KEYS);
    assert!(
        text.contains("[storage]")
            && text.contains("absent")
            && text.contains("the bucket does not exist")
            && text.contains("storage.bucket"),
        "{text}"
    );

    // Nothing listens at the endpoint.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = temp_dir("trunkfarm-e2e-storage-unreachable-");
    let text = refused_start(
        dir.path(),
        &storage_toml(&format!("http://127.0.0.1:{closed}"), "present"),
        &KEYS,
    );
    assert!(
        text.contains("cannot be reached") && text.contains("storage.endpoint"),
        "{text}"
    );

    // No credentials at all.
    let dir = temp_dir("trunkfarm-e2e-storage-nocreds-");
    let text = refused_start(dir.path(), &storage_toml(&moto.endpoint(), "present"), &[]);
    assert!(
        text.contains("AWS_ACCESS_KEY_ID") && text.contains("~/.aws/credentials"),
        "{text}"
    );
    assert!(!text.contains("e2e-storage-secret"), "{text}");

    // Keys the store does not know (moto checks signatures once its first
    // unchecked call, the bucket's creation, is spent).
    let strict = Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]);
    strict.create_bucket("present");
    let dir = temp_dir("trunkfarm-e2e-storage-badkeys-");
    let text = refused_start(
        dir.path(),
        &storage_toml(&strict.endpoint(), "present"),
        &KEYS,
    );
    assert!(
        text.contains("InvalidAccessKeyId") && text.contains("the credentials were refused"),
        "{text}"
    );
    assert!(!text.contains("e2e-storage-secret"), "{text}");

    // A config error is caught before the network: no bucket named.
    let dir = temp_dir("trunkfarm-e2e-storage-nobucketkey-");
    let text = refused_start(dir.path(), "\n[storage]\nbackend = \"s3\"\n", &KEYS);
    assert!(
        text.contains("storage.bucket") && text.contains("is required"),
        "{text}"
    );
}
