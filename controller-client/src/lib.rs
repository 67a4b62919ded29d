//! Companion of the Wukong disk agent: the agent client used by `wukongctl` and by operators.

pub mod agent_client;
pub mod output;
pub mod qmp;
