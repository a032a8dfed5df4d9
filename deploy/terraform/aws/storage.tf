# Checkpoints: imgtrain writes step_*/state.pt then step_*/manifest.json (the publication) and deletes old
# steps itself (checkpoint.keep_last_n); versioning keeps overwritten/deleted objects for
# checkpoint_noncurrent_days as a safety net.

resource "aws_kms_key" "checkpoints" {
  description         = "${var.cluster_name}: imgtrain checkpoints"
  enable_key_rotation = true
  policy              = local.kms_key_policy
}

resource "aws_s3_bucket" "checkpoints" {
  #checkov:skip=CKV_AWS_18:Access logging would need a second log bucket; checkpoint access is the training job's own, recorded in CloudTrail data events if wanted
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage of multi-GB checkpoints that the run can recreate; versioning protects against deletion
  #checkov:skip=CKV2_AWS_62:No consumer of bucket event notifications; imgtrain polls manifests itself
  bucket = var.checkpoint_bucket_name
}

resource "aws_s3_bucket_versioning" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.checkpoints.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "checkpoints" {
  bucket                  = aws_s3_bucket.checkpoints.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.checkpoint_noncurrent_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1 # a save killed mid-upload leaves parts behind
    }
  }
}
