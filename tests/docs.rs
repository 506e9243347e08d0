//! The documentation cannot drift from the code: the README's state table is the
//! code's transition table, `.env.example` lists every `CAPTIOND_*` variable, and each
//! command's `--help` offers only the settings that command uses.

use captiond::config::{DataSettings, ModelSettings, ServerSettings, WorkerSettings};
use captiond::queue::job::TRANSITIONS;
use clap::Args;

fn read(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

#[test]
fn the_readme_state_table_is_the_code_transition_table() {
    let readme = read("README.md");
    let rows: Vec<String> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| from | to | when |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(String::from)
        .collect();
    let code: Vec<String> = TRANSITIONS
        .iter()
        .map(|(from, to, why)| format!("| {} | {} | {} |", from.as_str(), to.as_str(), why))
        .collect();
    assert_eq!(rows, code);
}

#[test]
fn every_environment_variable_is_documented_in_env_example() {
    let example = read(".env.example");
    let mut cmd = clap::Command::new("captiond");
    cmd = DataSettings::augment_args(cmd);
    cmd = ModelSettings::augment_args(cmd);
    cmd = WorkerSettings::augment_args(cmd);
    cmd = ServerSettings::augment_args(cmd);
    let vars: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    assert!(vars.len() >= 20, "{vars:?}");
    for var in vars {
        assert!(
            example.contains(&format!("{var}=")),
            "{var} is missing from .env.example"
        );
    }
}

/// `captiond <args>`'s standard output (it must succeed).
fn help_of(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_captiond"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn upload_retention_is_offered_by_serve_alone() {
    // Only the HTTP service keeps uploads; the library commands have none to keep.
    let serve = help_of(&["serve", "--help"]);
    assert!(serve.contains("--keep-uploads-days"), "{serve}");
    assert!(serve.contains("--data-dir"), "{serve}");
    for command in ["caption", "status", "export"] {
        let help = help_of(&[command, "--help"]);
        assert!(help.contains("--data-dir"), "{command}: {help}");
        assert!(!help.contains("keep-uploads"), "{command}: {help}");
    }
}
