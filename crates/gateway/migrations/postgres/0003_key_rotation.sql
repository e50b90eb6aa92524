-- Key rotation: the re-encryption job and the rotation status find a merchant's records by
-- data-key version.
CREATE INDEX tokens_by_key_version ON tokens (merchant_id, data_key_version);
