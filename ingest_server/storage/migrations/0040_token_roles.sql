-- Roles and school scopes of API tokens (issue 18). A token has one role; `schools` limits a
-- school_admin (always) or a reader (optionally) to those schools, NULL meaning every school.
-- Existing tokens keep what they could do: admin -> district_admin, read -> reader (all schools).
-- `scopes` stays, written as the legacy view (district_admin: {admin}, any other role: {read}),
-- so older readers of the table still see no more than the token may do.
ALTER TABLE api_tokens ADD COLUMN IF NOT EXISTS role text;
ALTER TABLE api_tokens ADD COLUMN IF NOT EXISTS schools text[];

UPDATE api_tokens
SET role = CASE WHEN 'admin' = ANY(scopes) THEN 'district_admin' ELSE 'reader' END
WHERE role IS NULL;

-- A row inserted the old way (scopes only, e.g. by an older tool) gets the role its scopes meant.
CREATE OR REPLACE FUNCTION campus_api_token_role() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.role IS NULL THEN
        NEW.role := CASE WHEN 'admin' = ANY(NEW.scopes) THEN 'district_admin' ELSE 'reader' END;
    END IF;
    RETURN NEW;
END;
$$;
DROP TRIGGER IF EXISTS api_tokens_role ON api_tokens;
CREATE TRIGGER api_tokens_role BEFORE INSERT ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION campus_api_token_role();

ALTER TABLE api_tokens ALTER COLUMN role SET NOT NULL;
ALTER TABLE api_tokens ALTER COLUMN scopes SET DEFAULT ARRAY['read']::text[];
ALTER TABLE api_tokens DROP CONSTRAINT IF EXISTS api_tokens_role_check;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_role_check CHECK (
    role IN ('district_admin', 'school_admin', 'reader', 'service')
    AND CASE role
        WHEN 'school_admin' THEN schools IS NOT NULL AND cardinality(schools) > 0
        WHEN 'reader' THEN schools IS NULL OR cardinality(schools) > 0
        ELSE schools IS NULL
    END
);
