# docker buildx bake [--push]   (variables come from the environment, see the workflows)

variable "REGISTRY" {
  # e.g. docker.io/alice or ghcr.io/alice; set by CI from a repository variable
  default = "localhost"
}

variable "IMAGE_NAME" {
  default = "finetune-worker"
}

variable "TAG" {
  # dev on every push to main, preview on a release
  default = "dev"
}

variable "EXTRA_TAGS" {
  # comma-separated, e.g. the release version
  default = ""
}

variable "BASE_IMAGE" {
  default = "axolotlai/axolotl:0.21.0-py3.12-cu130-2.13.0"
}

variable "PREBAKE_MODEL" {
  default = ""
}

variable "GIT_SHA" {
  default = ""
}

group "default" {
  targets = ["worker"]
}

target "worker" {
  context    = "."
  dockerfile = "Dockerfile"
  platforms  = ["linux/amd64"]
  args = {
    BASE_IMAGE    = BASE_IMAGE
    PREBAKE_MODEL = PREBAKE_MODEL
  }
  tags = concat(
    ["${REGISTRY}/${IMAGE_NAME}:${TAG}"],
    [for t in compact(split(",", EXTRA_TAGS)) : "${REGISTRY}/${IMAGE_NAME}:${trimspace(t)}"]
  )
  labels = {
    "org.opencontainers.image.title"    = "finetune-worker"
    "org.opencontainers.image.base.name" = BASE_IMAGE
    "org.opencontainers.image.revision" = GIT_SHA
  }
}
