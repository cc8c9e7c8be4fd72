//! `iptun`: an IP tunnel. See `iptun --help`.
//!
//! Layout: `cli` (flags and config files), `server`/`client` (the daemons'
//! event loops around the sans-IO engines of `iptun_proto`), `tun` and
//! `transport` (the I/O), `netcfg` (addresses, routes, NAT), `control`
//! (`iptun status`, `iptun reload`), `service` (requests to the event loops,
//! systemd notifications), `metrics` (`/metrics`), `demo` (the
//! self-contained namespace demo).

mod capture;
mod cli;
mod client;
mod control;
mod daemon;
mod demo;
mod metrics;
mod netcfg;
mod probe;
mod server;
mod service;
mod steering;
#[cfg(test)]
mod testing;
mod transport;
mod tun;
mod url;
mod workers;

use std::io::Read as _;

use anyhow::Context as _;
use clap::Parser as _;
use iptun_proto::crypto::PrivateKey;

use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iptun: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
        }
        Command::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading a private key on stdin")?;
            let key = PrivateKey::from_base64(&text).context("the private key on stdin")?;
            println!("{}", key.public_key().to_base64());
            Ok(())
        }
        Command::Server(args) => runtime()?.block_on(server::run(args)),
        Command::Client(args) => runtime()?.block_on(client::run(args)),
        Command::Status(args) => runtime()?.block_on(status(args)),
        Command::Reload(args) => runtime()?.block_on(reload(args)),
        Command::Probe(args) => runtime()?.block_on(probe::run(args)),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "iptun", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => man(&mut std::io::stdout()),
        Command::Demo(args) => demo::run(&args),
        Command::DemoSink(args) => demo::sink(&args),
        Command::DemoSource(args) => demo::source(&args),
    }
}

/// The data path is one thread per daemon: both tunnel ends usually share a
/// machine's cores with the traffic they carry.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn status(args: cli::StatusArgs) -> anyhow::Result<()> {
    let paths = match args.control {
        Some(p) => vec![p],
        None => control::all_sockets(),
    };
    anyhow::ensure!(
        !paths.is_empty(),
        "no iptun daemon is running in this network namespace"
    );
    let mut all = Vec::new();
    for p in &paths {
        all.push(control::query(p).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        all.iter().for_each(|s| print!("{}", control::render(s)));
    }
    Ok(())
}

/// The manual page: `iptun` and a section per subcommand, from the flags'
/// own help texts.
fn man(out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::Man::new(cmd.clone()).render(out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        writeln!(out, ".SH \"IPTUN-{}\"", sub.get_name().to_uppercase())?;
        if let Some(about) = sub.get_about() {
            writeln!(out, "{about}")?;
        }
        clap_mangen::Man::new(sub.clone()).render_options_section(out)?;
    }
    Ok(())
}

async fn reload(args: cli::ReloadArgs) -> anyhow::Result<()> {
    let path = match args.control {
        Some(p) => p,
        None => match control::all_sockets().as_slice() {
            [one] => one.clone(),
            [] => anyhow::bail!("no iptun daemon is running in this network namespace"),
            several => anyhow::bail!(
                "several iptun daemons run here ({}): name one with --control",
                several
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let answer = control::reload(&path).await?;
    anyhow::ensure!(answer.ok, "{}", answer.message);
    println!("{}", answer.message);
    Ok(())
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = ["info", "debug", "trace"][usize::from(verbose.min(2))];
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_name_the_subcommands_and_flags() {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "iptun", &mut out);
        let text = String::from_utf8(out).unwrap();
        for word in ["server", "client", "probe", "--server-key", "--listen"] {
            assert!(text.contains(word), "{word} missing");
        }
    }

    #[test]
    fn the_man_page_has_every_subcommand() {
        let mut out = Vec::new();
        man(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH iptun"),
            "{}",
            &text[..200]
        );
        for section in [
            "IPTUN-SERVER",
            "IPTUN-CLIENT",
            "IPTUN-PROBE",
            "IPTUN-STATUS",
        ] {
            assert!(text.contains(section), "{section} missing");
        }
        assert!(!text.contains("DEMO-SINK"), "hidden commands stay hidden");
    }
}
