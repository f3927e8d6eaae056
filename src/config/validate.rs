//! Pure validation: raw → Config, every error at once.
use std::fmt;
use std::path::Path;

use super::Config;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path, e.g. `backend[1].buffer_limit`.
    pub key: String,
    /// 1-based line and column of the offending value or key (0 when unknown).
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (line {}, col {}): {}",
            self.key, self.line, self.col, self.message
        )
    }
}
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
impl std::error::Error for ConfigErrors {}

pub fn parse(_src: &str) -> Result<Config, ConfigErrors> {
    todo!()
}
pub fn load(_path: &Path) -> Result<Config, ConfigErrors> {
    todo!()
}
