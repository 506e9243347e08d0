//! The documentation cannot drift from the code: the README's state table is the
//! code's transition table, and `.env.example` lists every `CAPTIOND_*` variable.

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
