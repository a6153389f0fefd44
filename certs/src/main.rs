//! `fedinspect-certs`: creates a development PKI, enrols one more plant into it, and shows what a
//! certificate says about itself. All the work is in `fedinspect_common::pki` and `::tls`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use fedinspect_common::tls::{self, CertificateInfo};

/// Development PKI for fedinspect: a CA, the coordinator, an admin and the plants.
#[derive(Debug, Parser)]
#[command(name = "fedinspect-certs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a CA, coordinator, admin and plant certificates and the coordinator signing key.
    Init {
        /// Folder to create the PKI in.
        #[arg(long)]
        out: PathBuf,
        /// Number of plants, named plant-1 to plant-N [default: 3].
        #[arg(long, conflicts_with = "plant_names")]
        plants: Option<usize>,
        /// Plant ids to use instead of plant-1..plant-N, comma separated.
        #[arg(long, value_delimiter = ',')]
        plant_names: Vec<String>,
        /// Name in the admin certificate.
        #[arg(long, default_value = "admin")]
        admin: String,
        /// Name in the coordinator certificate.
        #[arg(long, default_value = "coordinator")]
        coordinator: String,
        /// Extra DNS name or IP address the coordinator is reached at (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always included.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Replace an existing PKI; every certificate the old CA issued stops working.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for one more plant from an existing CA folder.
    Enrol {
        /// The PKI folder holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The new plant's id.
        #[arg(long)]
        plant: String,
    },
    /// Print the identity, role and validity of each certificate in a PEM file.
    Show {
        /// PEM certificate file.
        cert: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Init {
            out,
            plants,
            plant_names,
            admin,
            coordinator,
            sans,
            force,
        } => {
            let plants = if plant_names.is_empty() {
                InitOptions::with_plant_count(plants.unwrap_or(3)).plants
            } else {
                plant_names
            };
            let opts = InitOptions {
                plants,
                admin,
                coordinator,
                coordinator_names: sans,
                force,
            };
            init(&out, &opts)
        }
        Command::Enrol { ca, plant } => enrol(&ca, &plant),
        Command::Show { cert } => show(&cert),
    }
}

fn init(out: &Path, opts: &InitOptions) -> Result<()> {
    let layout = pki::init(out, opts)
        .with_context(|| format!("cannot create a PKI in {}", out.display()))?;
    println!("created a development PKI in {}", layout.root().display());
    print_pair("CA", &layout.ca_cert(), &layout.ca_key());
    print_pair(
        "coordinator",
        &layout.coordinator_cert(),
        &layout.coordinator_key(),
    );
    print_pair(
        &format!("admin {}", opts.admin),
        &layout.admin_cert(),
        &layout.admin_key(),
    );
    for id in &opts.plants {
        print_pair(
            &format!("plant {id}"),
            &layout.plant_cert(id),
            &layout.plant_key(id),
        );
    }
    print_pair(
        "coordinator signing key",
        &layout.coordinator_verifying_key(),
        &layout.coordinator_signing_key(),
    );
    println!("keep ca.key on the enrolling machine; a plant needs only ca.pem and its own pair");
    Ok(())
}

fn enrol(dir: &Path, plant: &str) -> Result<()> {
    let files = pki::enrol_plant(dir, plant).with_context(|| {
        format!(
            "cannot enrol plant '{plant}' with the CA in {}",
            dir.display()
        )
    })?;
    println!("enrolled plant {plant}");
    print_pair(&format!("plant {plant}"), &files.cert, &files.key);
    println!(
        "  {:<24} {}",
        "trust",
        PkiLayout::new(dir).ca_cert().display()
    );
    Ok(())
}

fn show(path: &Path) -> Result<()> {
    let certs =
        tls::read_certificates(path).with_context(|| format!("cannot show {}", path.display()))?;
    let now = SystemTime::now();
    for (i, der) in certs.iter().enumerate() {
        let info = tls::certificate_info(der)
            .with_context(|| format!("certificate {} in {}", i + 1, path.display()))?;
        println!(
            "certificate {} of {} in {}",
            i + 1,
            certs.len(),
            path.display()
        );
        let identity = match tls::peer_identity(der) {
            Ok(id) => format!("{} {}", id.role, id.id),
            Err(_) if info.is_ca => "none (a CA certificate)".to_string(),
            Err(e) => format!("none ({e})"),
        };
        println!("  identity:    {identity}");
        println!("  subject:     {}", info.subject);
        println!("  issuer:      {}", info.issuer);
        println!("  serial:      {}", info.serial);
        println!("  valid from:  {}", tls::format_time(info.not_before));
        println!("  valid until: {}", tls::format_time(info.not_after));
        println!("  status:      {}", status(&info, now));
        println!("  names:       {}", names(&info));
        println!("  CA:          {}", if info.is_ca { "yes" } else { "no" });
    }
    Ok(())
}

fn status(info: &CertificateInfo, now: SystemTime) -> String {
    const DAY: u64 = 86_400;
    if now < info.not_before {
        "NOT YET VALID (check this machine's clock)".to_string()
    } else if let Ok(left) = info.not_after.duration_since(now) {
        format!("valid, expires in {} days", left.as_secs() / DAY)
    } else {
        "EXPIRED".to_string()
    }
}

fn names(info: &CertificateInfo) -> String {
    let all: Vec<String> = info
        .uris
        .iter()
        .map(|u| format!("URI {u}"))
        .chain(info.dns_names.iter().map(|d| format!("DNS {d}")))
        .chain(info.ip_addresses.iter().map(|ip| format!("IP {ip}")))
        .collect();
    if all.is_empty() {
        "none".to_string()
    } else {
        all.join(", ")
    }
}

fn print_pair(what: &str, cert: &Path, key: &Path) {
    println!("  {what:<24} {}  {}", cert.display(), key.display());
}
