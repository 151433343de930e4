package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

func (a *app) cmdTemplatesList(ctx context.Context, args []string) error {
	fs := a.newFlagSet("templates list")
	format := outputFlag(fs)
	if _, err := a.parseLeaf(fs, args, "templates list", "Lists templates.", 0, 0); err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.templates.ListTemplates(ctx, connect.NewRequest(&sandboxv1.ListTemplatesRequest{}))
	if err != nil {
		return err
	}
	if *format == formatJSON {
		return a.printJSON(resp.Msg)
	}
	t := newTable(a.stdout, "ID", "LANGUAGES", "IMAGE", "WARM", "BUILTIN", "DESCRIPTION")
	for _, tp := range resp.Msg.GetTemplates() {
		t.row(tp.GetId(), strings.Join(tp.GetLanguages(), ","), tp.GetImage(), strconv.Itoa(int(tp.GetWarmPoolSize())),
			strconv.FormatBool(tp.GetBuiltin()), tp.GetDescription())
	}
	return t.flush()
}

func (a *app) cmdTemplatesGet(ctx context.Context, args []string) error {
	fs := a.newFlagSet("templates get")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "templates get ID", "Shows one template.", 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.templates.GetTemplate(ctx, connect.NewRequest(&sandboxv1.GetTemplateRequest{TemplateId: pos[0]}))
	if err != nil {
		return err
	}
	tp := resp.Msg.GetTemplate()
	if *format == formatJSON {
		return a.printJSON(tp)
	}
	return a.printTemplate(tp)
}

func (a *app) printTemplate(tp *sandboxv1.Template) error {
	d := newDetails(a.stdout)
	d.field("ID", tp.GetId())
	d.field("Image", tp.GetImage())
	d.field("Languages", strings.Join(tp.GetLanguages(), ","))
	d.field("Description", tp.GetDescription())
	d.field("Default limits", formatLimits(tp.GetDefaultLimits()))
	d.field("Max limits", formatLimits(tp.GetMaxLimits()))
	d.field("Warm pool", strconv.Itoa(int(tp.GetWarmPoolSize())))
	d.field("Built-in", strconv.FormatBool(tp.GetBuiltin()))
	d.field("Created", timestamp(a.now(), tp.GetCreatedAt()))
	return d.flush()
}

func (a *app) cmdTemplatesCreate(ctx context.Context, args []string) error {
	fs := a.newFlagSet("templates create")
	id := fs.String("id", "", "template id (required)")
	image := fs.String("image", "", "image reference known to the agents' runtime (required)")
	var languages listFlag
	fs.Var(&languages, "language", "a `language` the image runs: python, node or bash (repeatable, required)")
	description := fs.String("description", "", "description")
	warm := fs.Int("warm-pool", 0, "ready containers to keep across the cluster")
	format := outputFlag(fs)
	if _, err := a.parseLeaf(fs, args, "templates create --id ID --image REF --language L... [flags]",
		"Creates a template with the server's default limits and prints its id.", 0, 0); err != nil {
		return err
	}
	switch {
	case *id == "":
		return usagef("templates create: --id is required")
	case *image == "":
		return usagef("templates create: --image is required")
	case len(languages) == 0:
		return usagef("templates create: at least one --language is required")
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.templates.CreateTemplate(ctx, connect.NewRequest(&sandboxv1.CreateTemplateRequest{Template: &sandboxv1.Template{
		Id: *id, Image: *image, Languages: languages, Description: *description, WarmPoolSize: int32(*warm),
	}}))
	if err != nil {
		return err
	}
	if *format == formatJSON {
		return a.printJSON(resp.Msg.GetTemplate())
	}
	_, err = fmt.Fprintln(a.stdout, resp.Msg.GetTemplate().GetId())
	return err
}

func (a *app) cmdTemplatesRm(ctx context.Context, args []string) error {
	fs := a.newFlagSet("templates rm")
	pos, err := a.parseLeaf(fs, args, "templates rm ID...", "Deletes templates no live session uses, and prints each id.", 1, -1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	return a.forEach(pos, "template", func(id string) error {
		_, err := c.templates.DeleteTemplate(ctx, connect.NewRequest(&sandboxv1.DeleteTemplateRequest{TemplateId: id}))
		return err
	})
}

func (a *app) cmdTemplatesUpdate(ctx context.Context, args []string) error {
	fs := a.newFlagSet("templates update")
	warm := fs.Int("warm-pool", -1, "ready containers to keep across the cluster (0 keeps none)")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "templates update ID --warm-pool N",
		"Changes a template's warm pool size (built-in templates too) and shows the template.", 1, 1)
	if err != nil {
		return err
	}
	if *warm < 0 {
		return usagef("templates update: --warm-pool N is required (N >= 0)")
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	size := int32(*warm)
	resp, err := c.templates.UpdateTemplate(ctx, connect.NewRequest(&sandboxv1.UpdateTemplateRequest{TemplateId: pos[0], WarmPoolSize: &size}))
	if err != nil {
		return err
	}
	if *format == formatJSON {
		return a.printJSON(resp.Msg.GetTemplate())
	}
	return a.printTemplate(resp.Msg.GetTemplate())
}
