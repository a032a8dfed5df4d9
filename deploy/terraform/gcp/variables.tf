variable "project_id" {
  description = "Google Cloud project."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID (6-30 lowercase letters, digits, hyphens)."
  }
}

variable "region" {
  description = "Region of the bucket and the cluster."
  type        = string
  default     = "us-central1"
  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.region))
    error_message = "region must be a region name such as us-central1."
  }
}

variable "zone" {
  description = "Zone of the GPU node pool (one zone: NCCL wants the nodes close; pick one with the GPU type)."
  type        = string
  default     = "us-central1-a"
  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]-[a-z]$", var.zone))
    error_message = "zone must be a zone name such as us-central1-a."
  }
}

variable "cluster_name" {
  description = "GKE cluster to create, or the existing one to add the GPU node pool to (create_cluster = false)."
  type        = string
  default     = "imgtrain"
  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{4,18}[a-z0-9])$", var.cluster_name))
    error_message = "cluster_name must be 6-20 lowercase letters, digits or hyphens, starting with a letter (service account IDs are derived from it)."
  }
}

variable "create_cluster" {
  description = "Create the GKE cluster (true) or add the node pool to the existing cluster_name in region (false)."
  type        = bool
  default     = true
}

variable "network" {
  description = "VPC network of a created cluster."
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork of a created cluster."
  type        = string
  default     = "default"
}

variable "master_authorized_cidrs" {
  description = "CIDRs allowed to reach the Kubernetes API endpoint of a created cluster."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for c in var.master_authorized_cidrs : can(cidrhost(c, 0))])
    error_message = "master_authorized_cidrs must hold CIDR blocks such as 203.0.113.0/24."
  }
}

variable "gpu_type" {
  description = "GPU: nvidia-tesla-a100 (a2-highgpu-8g), nvidia-a100-80gb (a2-ultragpu-8g) or nvidia-h100-80gb (a3-highgpu-8g)."
  type        = string
  default     = "nvidia-h100-80gb"
  validation {
    condition     = contains(["nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb"], var.gpu_type)
    error_message = "gpu_type must be nvidia-tesla-a100, nvidia-a100-80gb or nvidia-h100-80gb."
  }
}

variable "gpus_per_node" {
  description = "GPUs per node (the machine type follows: 8 -> a2-highgpu-8g / a2-ultragpu-8g / a3-highgpu-8g)."
  type        = number
  default     = 8
  validation {
    condition     = contains([1, 2, 4, 8], var.gpus_per_node)
    error_message = "gpus_per_node must be 1, 2, 4 or 8."
  }
}

variable "gpu_node_min" {
  description = "Fewest GPU nodes the autoscaler keeps (0: no cost when idle)."
  type        = number
  default     = 0
  validation {
    condition     = var.gpu_node_min >= 0 && var.gpu_node_min <= var.gpu_node_max && floor(var.gpu_node_min) == var.gpu_node_min
    error_message = "gpu_node_min must be a whole number between 0 and gpu_node_max."
  }
}

variable "gpu_node_max" {
  description = "Most GPU nodes: with 8 GPUs each, 1 to 8 nodes = 8 to 64 GPUs. The job's MAX_NODES must not exceed it."
  type        = number
  default     = 4
  validation {
    condition     = var.gpu_node_max >= 1 && var.gpu_node_max <= 64 && floor(var.gpu_node_max) == var.gpu_node_max
    error_message = "gpu_node_max must be a whole number from 1 to 64."
  }
}

variable "spot" {
  description = "Spot VMs for the GPU nodes (cheaper, reclaimed with 30 s notice: imgtrain saves on SIGTERM; keep fault_tolerance.grace_period below it)."
  type        = bool
  default     = false
}

variable "checkpoint_bucket_name" {
  description = "GCS bucket for checkpoints (globally unique)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", var.checkpoint_bucket_name))
    error_message = "checkpoint_bucket_name must be a valid bucket name (3-63 lowercase letters, digits, dots, hyphens, underscores)."
  }
}

variable "checkpoint_noncurrent_days" {
  description = "Days an overwritten or deleted checkpoint object version is kept."
  type        = number
  default     = 7
  validation {
    condition     = var.checkpoint_noncurrent_days >= 1
    error_message = "checkpoint_noncurrent_days must be at least 1."
  }
}

variable "kubernetes_namespace" {
  description = "Namespace of the job's Kubernetes service account imgtrain (Workload Identity binding)."
  type        = string
  default     = "default"
}

variable "labels" {
  description = "Extra labels for every resource."
  type        = map(string)
  default     = {}
}
