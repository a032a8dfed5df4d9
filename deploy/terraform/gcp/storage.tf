# Checkpoints: imgtrain writes step_*/state.pt then step_*/manifest.json (the publication) and deletes old
# steps itself (checkpoint.keep_last_n); versioning keeps overwritten/deleted objects for
# checkpoint_noncurrent_days as a safety net.

resource "google_storage_bucket" "checkpoints" {
  #checkov:skip=CKV_GCP_62:Access logs would need a second bucket; Cloud Audit Logs data access logs cover it if wanted
  name                        = var.checkpoint_bucket_name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = local.labels

  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.checkpoint_noncurrent_days
    }
    action {
      type = "Delete"
    }
  }
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload" # a save killed mid-upload leaves parts behind
    }
  }
}
