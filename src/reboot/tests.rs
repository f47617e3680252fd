//! Tests for reboots: detection, policies, windows, carrying out.

use super::*;
