//! The development PKI folder: its layout and permissions, refusal to overwrite, `--force`,
//! enrolment of one more plant, and the CA checks enrolment runs.

use std::path::Path;

use fedinspect_common::pki::{self, InitOptions, PkiError, PkiLayout};
use fedinspect_common::signing::{SigningKey, VerifyingKey};
use fedinspect_common::tls::{self, Role, TlsError, TlsMaterial};

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_the_documented_layout_with_private_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        coordinator_names: vec!["coord.plant.example".into(), "10.0.0.5".into()],
        ..InitOptions::with_plant_count(3)
    };
    let layout = pki::init(dir.path(), &opts).unwrap();
    let mut keys = vec![
        layout.ca_key(),
        layout.coordinator_key(),
        layout.admin_key(),
        layout.coordinator_signing_key(),
    ];
    let mut public = vec![
        layout.ca_cert(),
        layout.coordinator_cert(),
        layout.admin_cert(),
        layout.coordinator_verifying_key(),
    ];
    for id in ["plant-1", "plant-2", "plant-3"] {
        keys.push(layout.plant_key(id));
        public.push(layout.plant_cert(id));
        let m = TlsMaterial::load(&layout.plant_files(id), Role::Plant).unwrap();
        assert_eq!(m.identity().id, id);
    }
    #[cfg(unix)]
    {
        for k in &keys {
            assert_eq!(mode(k), 0o600, "{}", k.display());
        }
        for p in &public {
            assert_eq!(mode(p), 0o644, "{}", p.display());
        }
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 9, "unexpected files: {names:?}");

    let coordinator = TlsMaterial::load(&layout.coordinator_files(), Role::Coordinator).unwrap();
    assert_eq!(coordinator.identity().id, "coordinator");
    let info =
        tls::certificate_info(&tls::read_certificates(&layout.coordinator_cert()).unwrap()[0])
            .unwrap();
    assert_eq!(info.dns_names, ["localhost", "coord.plant.example"]);
    let ips: Vec<String> = info.ip_addresses.iter().map(|ip| ip.to_string()).collect();
    assert_eq!(ips, ["127.0.0.1", "::1", "10.0.0.5"]);
    let ca = tls::certificate_info(&tls::read_certificates(&layout.ca_cert()).unwrap()[0]).unwrap();
    assert!(ca.is_ca);
    let years = ca
        .not_after
        .duration_since(ca.not_before)
        .unwrap()
        .as_secs()
        / (365 * 86_400);
    assert_eq!(years, 10);

    let admin = TlsMaterial::load(&layout.admin_files(), Role::Admin).unwrap();
    assert_eq!(admin.identity().id, "admin");
    let signing = SigningKey::load(&layout.coordinator_signing_key()).unwrap();
    let public = VerifyingKey::load(&layout.coordinator_verifying_key()).unwrap();
    assert_eq!(signing.verifying_key(), public);
}

#[test]
fn init_takes_plant_and_admin_names() {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        plants: vec!["lyon".into(), "graz-2".into()],
        admin: "ops".into(),
        ..InitOptions::default()
    };
    let layout = pki::init(dir.path(), &opts).unwrap();
    TlsMaterial::load(&layout.plant_files("graz-2"), Role::Plant).unwrap();
    let admin = TlsMaterial::load(&layout.admin_files(), Role::Admin).unwrap();
    assert_eq!(admin.identity().id, "ops");
    assert!(!layout.plant_cert("plant-1").exists());
}

#[test]
fn init_refuses_bad_or_duplicate_names_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    for (opts, expect_dup) in [
        (
            InitOptions {
                plants: vec!["Lyon".into()],
                ..InitOptions::default()
            },
            false,
        ),
        (
            InitOptions {
                admin: "a b".into(),
                ..InitOptions::default()
            },
            false,
        ),
        (
            InitOptions {
                plants: vec!["x".into(), "x".into()],
                ..InitOptions::default()
            },
            true,
        ),
    ] {
        let err = pki::init(dir.path(), &opts).unwrap_err();
        match err {
            PkiError::DuplicatePlant(_) => assert!(expect_dup),
            PkiError::Identity(TlsError::InvalidName { .. }) => assert!(!expect_dup),
            other => panic!("unexpected {other}"),
        }
    }
    let opts = InitOptions {
        coordinator_names: vec!["bad name".into()],
        ..InitOptions::default()
    };
    let err = pki::init(dir.path(), &opts).unwrap_err();
    assert!(matches!(err, PkiError::InvalidServerName(_)), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "files written before refusing"
    );
}

#[test]
fn init_never_replaces_a_ca_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions::with_plant_count(1);
    let layout = pki::init(dir.path(), &opts).unwrap();
    let ca_before = std::fs::read(layout.ca_cert()).unwrap();
    let err = pki::init(dir.path(), &opts).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyInitialised { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(layout.ca_cert()).unwrap(), ca_before);

    // Another plant list still collides on the CA itself.
    let other = InitOptions {
        plants: vec!["new".into()],
        ..opts.clone()
    };
    assert!(matches!(
        pki::init(dir.path(), &other),
        Err(PkiError::AlreadyInitialised { .. })
    ));

    pki::enrol_plant(dir.path(), "late").unwrap();
    let forced = InitOptions {
        force: true,
        ..opts
    };
    pki::init(dir.path(), &forced).unwrap();
    assert_ne!(std::fs::read(layout.ca_cert()).unwrap(), ca_before);
    assert!(
        !layout.plant_cert("late").exists(),
        "plant signed by the old CA left behind"
    );
    TlsMaterial::load(&layout.plant_files("plant-1"), Role::Plant).unwrap();
}

#[test]
fn enrol_issues_a_plant_the_existing_ca_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let layout = pki::init(dir.path(), &InitOptions::with_plant_count(1)).unwrap();
    let ca_before = std::fs::read(layout.ca_cert()).unwrap();
    let files = pki::enrol_plant(dir.path(), "plant-7").unwrap();
    assert_eq!(files, layout.plant_files("plant-7"));
    let m = TlsMaterial::load(&files, Role::Plant).unwrap();
    assert_eq!(
        (m.identity().role, m.identity().id.as_str()),
        (Role::Plant, "plant-7")
    );
    assert_eq!(std::fs::read(layout.ca_cert()).unwrap(), ca_before);
    #[cfg(unix)]
    assert_eq!(mode(&files.key), 0o600);

    let err = pki::enrol_plant(dir.path(), "plant-7").unwrap_err();
    assert!(matches!(err, PkiError::PlantExists { .. }), "{err}");
    let err = pki::enrol_plant(dir.path(), "../evil").unwrap_err();
    assert!(
        matches!(err, PkiError::Identity(TlsError::InvalidName { .. })),
        "{err}"
    );
}

#[test]
fn enrol_needs_a_ca_it_can_trust() {
    let dir = tempfile::tempdir().unwrap();
    let err = pki::enrol_plant(dir.path(), "plant-1").unwrap_err();
    assert!(matches!(err, PkiError::NoCa { .. }), "{err}");
    assert!(err.to_string().contains("fedinspect-certs init"), "{err}");

    let layout = pki::init(dir.path(), &InitOptions::with_plant_count(0)).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let loose = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(layout.ca_key(), loose).unwrap();
        let err = pki::enrol_plant(dir.path(), "plant-1").unwrap_err();
        assert!(
            matches!(err, PkiError::InsecureKey { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(layout.ca_key(), std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    let other = tempfile::tempdir().unwrap();
    let theirs: PkiLayout = pki::init(other.path(), &InitOptions::with_plant_count(0)).unwrap();
    std::fs::copy(theirs.ca_key(), layout.ca_key()).unwrap();
    let err = pki::enrol_plant(dir.path(), "plant-1").unwrap_err();
    assert!(matches!(err, PkiError::CaKeyMismatch { .. }), "{err}");

    std::fs::write(layout.ca_cert(), "garbage").unwrap();
    let err = pki::enrol_plant(dir.path(), "plant-1").unwrap_err();
    assert!(matches!(err, PkiError::Malformed { .. }), "{err}");
}
