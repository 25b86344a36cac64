//! The genesis file: the chain's id, its operator key, and the tenants it starts with.

use std::path::Path;

use serde::{Deserialize, Serialize};

use hoard_types::constants::DEDUP_WINDOW_EVENTS_PER_TENANT_MAX;
use hoard_types::{Hash, PublicKey, TenantId};

use crate::error::{LedgerError, Result};

/// What every replica and follower of one chain must agree on before block 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    /// Signed into every transaction, so that a transaction for one chain never applies on another.
    pub chain_id: u64,
    /// The operator key: the only key that may register tenants.
    pub operator: PublicKey,
    /// Tenants registered from the start.
    #[serde(default)]
    pub tenants: Vec<GenesisTenant>,
    /// Most events one tenant's deduplication window holds (None: the default,
    /// [`DEDUP_WINDOW_EVENTS_PER_TENANT_MAX`]). Size it to the replicas' memory: about 100
    /// bytes per event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_events_per_tenant_max: Option<u64>,
}

/// A tenant (studio) registered in the genesis file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisTenant {
    pub id: TenantId,
    pub name: String,
    pub studio_key: PublicKey,
}

/// TOML form: keys as hex strings. Unknown keys are refused.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenesisFile {
    chain_id: u64,
    operator: String,
    #[serde(default)]
    tenants: Vec<GenesisTenantFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window_events_per_tenant_max: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenesisTenantFile {
    id: u64,
    name: String,
    studio_key: String,
}

impl Genesis {
    /// Reads a genesis file (TOML; keys in hex).
    pub fn load(path: &Path) -> Result<Genesis> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LedgerError::Config(format!("cannot read {}: {e}", path.display())))?;
        Genesis::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Genesis> {
        let file: GenesisFile = toml::from_str(text).map_err(|e| LedgerError::Config(e.to_string()))?;
        let key = |hex: &str| PublicKey::from_hex(hex).map_err(|e| LedgerError::Config(e.to_string()));
        Ok(Genesis {
            chain_id: file.chain_id,
            operator: key(&file.operator)?,
            tenants: file
                .tenants
                .iter()
                .map(|t| {
                    Ok(GenesisTenant {
                        id: TenantId(t.id),
                        name: t.name.clone(),
                        studio_key: key(&t.studio_key)?,
                    })
                })
                .collect::<Result<_>>()?,
            window_events_per_tenant_max: file.window_events_per_tenant_max,
        })
    }

    pub fn to_toml(&self) -> String {
        let file = GenesisFile {
            chain_id: self.chain_id,
            operator: self.operator.to_hex(),
            tenants: self
                .tenants
                .iter()
                .map(|t| GenesisTenantFile {
                    id: t.id.0,
                    name: t.name.clone(),
                    studio_key: t.studio_key.to_hex(),
                })
                .collect(),
            window_events_per_tenant_max: self.window_events_per_tenant_max,
        };
        toml::to_string_pretty(&file).expect("genesis serialises")
    }

    /// The cap on one tenant's deduplication window in force on this chain.
    pub fn window_cap(&self) -> u64 {
        self.window_events_per_tenant_max
            .unwrap_or(DEDUP_WINDOW_EVENTS_PER_TENANT_MAX)
    }

    /// The hash every block 1 names as its parent.
    pub fn hash(&self) -> Hash {
        Hash::of(&rmp_serde::to_vec(self).expect("genesis serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_types::Keypair;

    #[test]
    fn genesis_round_trips_through_toml() {
        let genesis = Genesis {
            chain_id: 9,
            operator: Keypair::from_seed([1; 32]).public(),
            tenants: vec![GenesisTenant {
                id: TenantId(1),
                name: "acme".into(),
                studio_key: Keypair::from_seed([2; 32]).public(),
            }],
            window_events_per_tenant_max: Some(1_000),
        };
        let again = Genesis::from_toml(&genesis.to_toml()).unwrap();
        assert_eq!(again, genesis);
        assert_eq!(again.hash(), genesis.hash());
    }
}
