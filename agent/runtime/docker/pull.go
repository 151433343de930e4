package docker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/distribution/reference"
	"github.com/docker/docker/api/types/image"

	"github.com/sandboxhq/sandbox"
)

// pull fetches a missing image from its registry, once even when many
// starts want it together. Images named without a registry (localhost/...,
// the ones make images loads) are never pulled. Docker decides itself which
// registries it reaches over plain HTTP (127.0.0.0/8 and its
// --insecure-registry list).
func (r *Runtime) pull(ctx context.Context, name string) error {
	r.pullMu.Lock()
	defer r.pullMu.Unlock()
	if _, err := r.cli.ImageInspect(ctx, name); err == nil {
		return nil // another start pulled it meanwhile
	}
	ref, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return fmt.Errorf("%w: image %s is not a valid reference: %v", sandbox.ErrInvalidArgument, name, err)
	}
	host := reference.Domain(ref)
	if host == "localhost" {
		return fmt.Errorf("%w: image %s is not in Docker at %s, and localhost/ names no registry to pull it from (build it with make images)",
			sandbox.ErrFailedPrecondition, name, r.cli.DaemonHost())
	}
	begin := time.Now()
	r.log.Info("pulling image", "image", name, "registry", host)
	rc, err := r.cli.ImagePull(ctx, name, image.PullOptions{})
	if err == nil {
		err = pullResult(rc)
		rc.Close()
	}
	if err != nil {
		if cerrdefs.IsNotFound(err) {
			return fmt.Errorf("%w: image %s is neither in Docker nor in registry %s", sandbox.ErrFailedPrecondition, name, host)
		}
		return fmt.Errorf("%w: pull image %s from %s: %v", sandbox.ErrUnavailable, name, host, err)
	}
	r.log.Info("image pulled", "image", name, "duration", time.Since(begin))
	return nil
}

// pullResult reads a pull's progress stream to its end and returns the
// error it reports, if any.
func pullResult(rc io.Reader) error {
	dec := json.NewDecoder(rc)
	for {
		var msg struct {
			Error string `json:"error"`
		}
		if err := dec.Decode(&msg); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if msg.Error != "" {
			return errors.New(msg.Error)
		}
	}
}
