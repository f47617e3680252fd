//! The agent's configuration: the TOML file, user-data filling its gaps, validated settings.

use serde::{Deserialize, Serialize};

/// What `fh apply nixos` is asked to do with a new closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Activate now and make it the boot default.
    #[default]
    Switch,
    /// Make it the boot default; it runs after the next reboot.
    Boot,
    /// Activate now without making it the boot default.
    Test,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Switch => "switch",
            Operation::Boot => "boot",
            Operation::Test => "test",
        }
    }
}

impl std::str::FromStr for Operation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "switch" => Ok(Operation::Switch),
            "boot" => Ok(Operation::Boot),
            "test" => Ok(Operation::Test),
            other => Err(format!("'{other}' is not an operation (switch, boot or test)")),
        }
    }
}
