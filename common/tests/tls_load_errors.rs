//! Every start-up refusal of `TlsMaterial::load`, one test per `TlsError` variant, plus the
//! accepted case for each role.

use std::path::Path;

use fedinspect_common::pki::{self, InitOptions, PkiLayout, Validity};
use fedinspect_common::tls::{self, Role, TlsError, TlsFiles, TlsMaterial};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};

fn new_pki(dir: &Path) -> PkiLayout {
    pki::init(dir, &InitOptions::with_plant_count(2)).unwrap()
}

fn load_err(files: &TlsFiles, role: Role) -> TlsError {
    TlsMaterial::load(files, role).expect_err("load should refuse")
}

/// Issues a leaf from the PKI's CA with rcgen directly, for certificates our issuer never makes.
fn issue_raw(layout: &PkiLayout, params: CertificateParams, out: &Path) -> TlsFiles {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(layout.ca_key()).unwrap()).unwrap();
    let ca_params =
        CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(layout.ca_cert()).unwrap())
            .unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let files = TlsFiles {
        ca_cert: layout.ca_cert(),
        cert: out.join("raw.pem"),
        key: out.join("raw.key"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

#[test]
fn accepts_each_role_and_hands_tonic_the_checked_pem() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    for (files, role, id) in [
        (layout.coordinator_files(), Role::Coordinator, "coordinator"),
        (layout.admin_files(), Role::Admin, "admin"),
        (layout.plant_files("plant-2"), Role::Plant, "plant-2"),
    ] {
        let material = TlsMaterial::load(&files, role).unwrap();
        assert_eq!(
            (material.identity().role, material.identity().id.as_str()),
            (role, id)
        );
        material.server_config().unwrap();
        material.client_config().unwrap();
        let pem = material.tonic_pem();
        assert_eq!(pem.ca_pem, std::fs::read(&files.ca_cert).unwrap());
        assert_eq!(pem.cert_pem, std::fs::read(&files.cert).unwrap());
        assert_eq!(pem.key_pem, std::fs::read(&files.key).unwrap());
        assert!(format!("{pem:?}").contains("redacted"));
    }
    tls::server_config(&layout.coordinator_files()).unwrap();
    tls::client_config(&layout.plant_files("plant-1"), Role::Plant).unwrap();
    tls::tonic_pem(&layout.admin_files(), Role::Admin).unwrap();
}

#[test]
fn missing_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let good = layout.plant_files("plant-1");
    let missing = dir.path().join("nope.pem");
    for files in [
        TlsFiles {
            ca_cert: missing.clone(),
            ..good.clone()
        },
        TlsFiles {
            cert: missing.clone(),
            ..good.clone()
        },
        TlsFiles {
            key: missing.clone(),
            ..good.clone()
        },
    ] {
        let err = load_err(&files, Role::Plant);
        assert!(
            matches!(&err, TlsError::MissingFile { path, .. } if *path == missing),
            "{err}"
        );
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }
}

#[test]
fn unreadable_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let files = TlsFiles {
        cert: layout.plants_dir(),
        ..layout.plant_files("plant-1")
    };
    let err = load_err(&files, Role::Plant);
    assert!(matches!(err, TlsError::Io { .. }), "{err}");
}

#[test]
fn unreadable_pem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let files = layout.plant_files("plant-1");
    std::fs::write(
        &files.cert,
        "-----BEGIN CERTIFICATE-----\n!!! not base64 !!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = load_err(&files, Role::Plant);
    assert!(matches!(err, TlsError::UnreadablePem { .. }), "{err}");
}

#[test]
fn file_without_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let files = TlsFiles {
        cert: layout.plant_key("plant-1"),
        ..layout.plant_files("plant-1")
    };
    let err = load_err(&files, Role::Plant);
    assert!(
        matches!(
            err,
            TlsError::NoCertificate {
                what: "certificate",
                ..
            }
        ),
        "{err}"
    );
    let files = TlsFiles {
        ca_cert: layout.ca_key(),
        ..layout.plant_files("plant-1")
    };
    let err = load_err(&files, Role::Plant);
    assert!(
        matches!(
            err,
            TlsError::NoCertificate {
                what: "CA certificate",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn file_without_private_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let files = TlsFiles {
        key: layout.plant_cert("plant-1"),
        ..layout.plant_files("plant-1")
    };
    let err = load_err(&files, Role::Plant);
    assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
}

#[test]
fn key_of_another_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let files = TlsFiles {
        key: layout.plant_key("plant-2"),
        ..layout.plant_files("plant-1")
    };
    let err = load_err(&files, Role::Plant);
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
}

#[test]
fn expired_certificate_is_refused_with_its_dates() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let validity = Validity::expired();
    let files = pki::issue_test_plant(layout.root(), "plant-9", validity, dir.path()).unwrap();
    let err = load_err(&files, Role::Plant);
    let TlsError::CertificateExpired { not_after, .. } = &err else {
        panic!("expected CertificateExpired, got {err}");
    };
    assert_eq!(*not_after, tls::format_time(validity.not_after));
    assert!(err.to_string().contains(not_after.as_str()), "{err}");
}

#[test]
fn not_yet_valid_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let files = pki::issue_test_plant(
        layout.root(),
        "plant-9",
        Validity::not_yet_valid(),
        dir.path(),
    )
    .unwrap();
    let err = load_err(&files, Role::Plant);
    assert!(
        matches!(err, TlsError::CertificateNotYetValid { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("clock"), "{err}");
}

#[test]
fn certificate_from_another_ca_is_refused_at_load() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ours = new_pki(dir.path());
    let theirs = new_pki(other.path());
    for (files, role) in [
        (theirs.plant_files("plant-1"), Role::Plant),
        (theirs.coordinator_files(), Role::Coordinator),
    ] {
        let files = TlsFiles {
            ca_cert: ours.ca_cert(),
            ..files
        };
        let err = load_err(&files, role);
        assert!(
            matches!(err, TlsError::NotSignedByCa { .. }),
            "{role}: {err}"
        );
    }
}

#[test]
fn leaf_given_as_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let files = TlsFiles {
        ca_cert: layout.plant_cert("plant-2"),
        ..layout.plant_files("plant-1")
    };
    let err = load_err(&files, Role::Plant);
    assert!(matches!(err, TlsError::InvalidCa { .. }), "{err}");
}

#[test]
fn certificate_without_identity_uri_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let mut params = CertificateParams::new(vec!["plant-1.example".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let files = issue_raw(&layout, params, dir.path());
    let err = load_err(&files, Role::Plant);
    assert!(
        matches!(err, TlsError::NotFedinspectIdentity { .. }),
        "{err}"
    );
}

#[test]
fn certificate_of_another_role_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let err = load_err(&layout.admin_files(), Role::Plant);
    assert!(
        matches!(
            err,
            TlsError::WrongRole {
                expected: Role::Plant,
                found: Role::Admin,
                ..
            }
        ),
        "{err}"
    );
    let err = load_err(&layout.plant_files("plant-1"), Role::Coordinator);
    assert!(matches!(err, TlsError::WrongRole { .. }), "{err}");
}

#[test]
fn certificate_without_client_auth_usage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = new_pki(dir.path());
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        "urn:fedinspect:plant:plant-7".try_into().unwrap(),
    )];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let files = issue_raw(&layout, params, dir.path());
    let err = load_err(&files, Role::Plant);
    assert!(matches!(err, TlsError::CertificateRejected { .. }), "{err}");
}

#[test]
fn peer_without_certificate_has_no_identity() {
    let err = tls::identity_of_peer(None).unwrap_err();
    assert!(matches!(err, TlsError::NoPeerCertificate), "{err}");
}
