//! Real TLS 1.3 handshakes in memory against [`AuditedServerTls`]: each wrong client
//! certificate is refused and leaves its reason and presented identity in the slot.

use std::io::{self, Cursor};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

use super::*;
use crate::pki::{self, InitOptions, Validity};
use crate::tls::{Role, TlsMaterial};

fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    })
}

/// Runs a handshake in memory; the server's error, as the TLS acceptor would return it.
fn handshake(
    server: &AuditedServerTls,
    client_config: Arc<ClientConfig>,
) -> (io::Result<()>, RefusalSlot) {
    let (config, slot) = server.connection().unwrap();
    let mut s = ServerConnection::new(config).unwrap();
    let mut c =
        ClientConnection::new(client_config, ServerName::try_from("localhost").unwrap()).unwrap();
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = Cursor::new(buf);
        while (rd.position() as usize) < rd.get_ref().len() {
            s.read_tls(&mut rd).unwrap();
            if let Err(e) = s.process_new_packets() {
                return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), slot);
            }
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = Cursor::new(buf);
        while (rd.position() as usize) < rd.get_ref().len() {
            c.read_tls(&mut rd).unwrap();
            let _ = c.process_new_packets();
        }
        if !s.is_handshaking() && !c.is_handshaking() && !c.wants_write() {
            return (Ok(()), slot);
        }
    }
    panic!("the handshake neither finished nor failed");
}

#[test]
fn each_refused_certificate_leaves_its_reason_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki::init(&dir.path().join("ours"), &InitOptions::with_plant_count(1)).unwrap();
    let theirs = pki::init(
        &dir.path().join("theirs"),
        &InitOptions::with_plant_count(1),
    )
    .unwrap();
    let server = TlsMaterial::load(&ours.coordinator_files(), Role::Coordinator)
        .unwrap()
        .audited_server_tls(&[b"h2"])
        .unwrap();
    let ca = ours.ca_cert();
    let issue = |validity, name: &str| {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        pki::issue_test_plant(ours.root(), "plant-1", validity, &out).unwrap()
    };
    let expired = issue(Validity::expired(), "expired");
    let early = issue(Validity::not_yet_valid(), "early");
    let good = ours.plant_files("plant-1");
    let foreign = theirs.plant_files("plant-1");

    let (ok, slot) = handshake(&server, client(&ca, Some((&good.cert, &good.key))));
    ok.expect("our plant's certificate is accepted");
    assert!(slot.0.lock().unwrap().is_none());

    let cases = [
        ("no certificate", None, RefusalReason::NoCertificate, false),
        (
            "another CA",
            Some((&foreign.cert, &foreign.key)),
            RefusalReason::UnknownIssuer,
            true,
        ),
        (
            "expired",
            Some((&expired.cert, &expired.key)),
            RefusalReason::Expired,
            true,
        ),
        (
            "not yet valid",
            Some((&early.cert, &early.key)),
            RefusalReason::NotYetValid,
            true,
        ),
    ];
    for (case, identity, reason, presented) in cases {
        let identity = identity
            .map(|(c, k): (&std::path::PathBuf, &std::path::PathBuf)| (c.as_path(), k.as_path()));
        let (result, slot) = handshake(&server, client(&ca, identity));
        let err = result.expect_err(case);
        let refusal = slot
            .refusal(&err)
            .unwrap_or_else(|| panic!("{case}: {err}"));
        assert_eq!(refusal.reason, reason, "{case}: {refusal}");
        assert_eq!(refusal.presented.is_some(), presented, "{case}: {refusal}");
        if presented {
            let p = refusal.presented.as_ref().unwrap();
            assert_eq!(
                p.claimed_identity.as_deref(),
                Some("urn:fedinspect:plant:plant-1"),
                "{case}"
            );
            assert!(!p.serial.is_empty());
            assert!(refusal.to_string().contains("urn:fedinspect:plant:plant-1"));
        }
    }
}

#[test]
fn failures_that_are_not_about_certificates_are_not_refusals() {
    let slot = RefusalSlot::default();
    let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
    assert_eq!(slot.refusal(&eof), None);
    let garbage = io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
    );
    assert_eq!(slot.refusal(&garbage), None);
    assert_eq!(
        RefusalReason::of(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked
        )),
        Some(RefusalReason::Revoked)
    );
}
